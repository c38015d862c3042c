/* Crashes for the signature tests: one executable, several bugs, each reachable in more than one way.
 *
 *   bugs MODE [NAME]
 *     near-a, near-b  write_site() called from caller_a() / caller_b(): the caller is within the top frames
 *     deep-a, deep-b  caller_a/b -> middle_1 -> middle_2 -> write_site(): the callers are below them
 *     other           read_site(): another crash site (a NULL read)
 *     abort           abort() called from abort_site(): raise and pthread_kill are in libc's frames
 *     handler         a SIGSEGV handler that calls abort(): the handler's frames say nothing of the bug
 *     NAME            a new comm, up to 15 bytes
 * Built with -O0 so that no call is inlined or made a tail call.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

static volatile int sink;

__attribute__((noinline)) static void write_site(void) { char *p = (char *)"text"; p[1] = 'n'; /* WRITE SITE */ }
__attribute__((noinline)) static void read_site(void) { int *volatile p = 0; sink = *p; /* READ SITE */ }
__attribute__((noinline)) static void abort_site(void) { abort(); /* ABORT SITE */ }
__attribute__((noinline)) static void middle_2(void) { write_site(); sink++; }
__attribute__((noinline)) static void middle_1(void) { middle_2(); sink++; }
__attribute__((noinline)) static void caller_a(int deep) { if (deep) middle_1(); else write_site(); sink++; }
__attribute__((noinline)) static void caller_b(int deep) { if (deep) middle_1(); else write_site(); sink += 2; }

static void on_segv(int sig) { (void)sig; abort(); }

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "near-a";
    if (argc > 2 && argv[2][0])
        prctl(PR_SET_NAME, argv[2], 0, 0, 0);
    if (!strcmp(mode, "near-a")) caller_a(0);
    else if (!strcmp(mode, "near-b")) caller_b(0);
    else if (!strcmp(mode, "deep-a")) caller_a(1);
    else if (!strcmp(mode, "deep-b")) caller_b(1);
    else if (!strcmp(mode, "other")) read_site();
    else if (!strcmp(mode, "abort")) abort_site();
    else if (!strcmp(mode, "handler")) { signal(SIGSEGV, on_segv); read_site(); }
    return 2;
}
