/* Maps FILE (on the blocking FUSE filesystem) and touches its first page; then maps the file's second page
 * (never read yet) over the middle of its own command line, which PADDING makes several pages long: reading
 * /proc/<pid>/cmdline then waits on the FUSE server. Says "ready" and crashes. Usage: fuse_victim FILE PADDING */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long page = sysconf(_SC_PAGESIZE);
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    char *map = mmap(NULL, 1 << 20, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    volatile char first = map[0];
    (void)first;
    uintptr_t start = ((uintptr_t)argv[2] + page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t end = ((uintptr_t)argv[2] + strlen(argv[2])) & ~(uintptr_t)(page - 1);
    if (end <= start) { fputs("padding too short\n", stderr); return 1; }
    if (mmap((void *)start, page, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, page) == MAP_FAILED) {
        perror("mmap over argv"); return 1;
    }
    puts("ready");
    fflush(stdout);
    raise(SIGSEGV);
    return 0;
}
