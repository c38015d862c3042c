/* The benchmark's handler wrapper: runs a core_pattern handler and logs how it went.
 *
 *   rsswrap HANDLER [ARGS...]
 *
 * Forks and execs HANDLER with the kernel's pipe as stdin, closes its own copy of the pipe
 * (the kernel waits until every reader has closed it), waits for the handler and appends one
 * line "<peak RSS KiB> <wall seconds> <wait status> <CPU seconds>" to "<argv[0]>.log". The peak
 * RSS is wait4's ru_maxrss: the largest of the handler and the children it waited for; the CPU
 * seconds are wait4's user + system time, which include those children's (a debugger's, say).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec start, end;
    struct rusage ru;
    char line[160], path[4096];
    int status = 0, fd, n;
    pid_t pid;

    if (argc < 2)
        return 2;
    clock_gettime(CLOCK_MONOTONIC, &start);
    pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        /* A socket-activated service checks that LISTEN_PID is its own PID. */
        if (getenv("LISTEN_PID")) {
            snprintf(line, sizeof line, "%d", (int)getpid());
            setenv("LISTEN_PID", line, 1);
        }
        execv(argv[1], argv + 1);
        _exit(127);
    }
    close(0);
    memset(&ru, 0, sizeof ru);
    if (wait4(pid, &status, 0, &ru) < 0)
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &end);
    n = snprintf(line, sizeof line, "%ld %.6f %d %.6f\n", ru.ru_maxrss,
                 (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9, status,
                 ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    snprintf(path, sizeof path, "%s.log", argv[0]);
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, line, n) != n)
        return 1;
    return close(fd) == 0 ? 0 : 1;
}
