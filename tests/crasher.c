/* The test crasher: optionally fills memory so the core has a known size and data mix, then
 * crashes on a marked line (the seed article's program).
 *
 *   crasher [MIB [NAME [SIGNAL]]]
 *     MIB     heap to fill: 25% pseudo-random, 25% text, 50% zero pages (default 0)
 *     NAME    a new comm (thread name), up to 15 bytes
 *     SIGNAL  raise this signal instead of touching read-only memory
 */
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

static void fill(unsigned char *p, size_t size)
{
    static const char text[] = "corepipe test crasher: the quick brown fox jumps over the lazy dog 0123456789\n";
    uint64_t x = 88172645463325252ULL;
    size_t quarter = size / 4, i;
    for (i = 0; i + 8 <= quarter; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    for (i = 0; i < quarter; i++)
        p[quarter + i] = text[i % (sizeof text - 1)];
    memset(p + 2 * quarter, 0, size - 2 * quarter);
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 0;
    if (argc > 2 && argv[2][0])
        prctl(PR_SET_NAME, argv[2], 0, 0, 0);
    if (mib) {
        unsigned char *heap = malloc(mib << 20);
        if (!heap)
            return 3;
        fill(heap, mib << 20);
    }
    if (argc > 3)
        raise(atoi(argv[3]));
    char *str = "GfG";
    *(str + 1) = 'n'; /* CRASH HERE */
    return 0;
}
