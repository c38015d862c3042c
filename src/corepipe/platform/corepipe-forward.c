/* corepipe-forward: the kernel's pipe handler for hosts without Python (Container-Optimized OS, Bottlerocket,
 * Flatcar, Talos). It hands the crash to `corepipe serve` (running in a pod, or anywhere on the host) and
 * exits; the server's worker collects it while the kernel still holds the crashed process.
 *
 * `corepipe install` builds it from this file where the host has a C compiler and makes it the pattern's
 * program (platform/static_forwarder.py), so every crash on a host with `corepipe serve` running starts no
 * Python at all.
 *
 * The protocol is corepipe's (src/corepipe/platform/forward.py, docs/forwarding.md): on the AF_UNIX
 * SOCK_SEQPACKET socket COREPIPE_FORWARD_SOCKET,
 *   1. send "corepipe-forward 1\n" + the arguments after "collect", joined by NUL, with SCM_RIGHTS carrying
 *      stdin (the kernel's pipe) and the pidfd named by %F (when the arguments have one);
 *   2. wait up to ACK_SECONDS for "A" (accepted) or "B..." (busy);
 *   3. on "A" send "G": the crash is the server's, exit 0.
 * Anything else (no server, no answer in time, busy): exec COREPIPE_HANDLER (the Python handler, `corepipe
 * collect`), which collects the crash itself; when that cannot be executed either, one line in the kernel
 * log says the core was dropped, and the exit closes the pipe (the kernel ends the dump, the process is
 * reaped).
 *
 * Usage, as the pattern's program (the same arguments as corepipe's handler):
 *   |/path/corepipe-forward collect [--config PATH] %P %p %I %u %g %s %t %c %d %F %h %e
 * `corepipe-forward --show` prints the socket and the handler it was built with ("socket PATH", "handler PATH").
 * Build: gcc -static -O2 -o corepipe-forward corepipe-forward.c
 *   (-DCOREPIPE_FORWARD_SOCKET='"/run/corepipe/forward.sock"' -DCOREPIPE_HANDLER='"/usr/local/bin/corepipe"')
 * Exit codes: 0 handed over (or shown); 1 not handed over and no handler could be executed; 2 bad arguments.
 * No allocation, no library beyond libc; the kernel starts it with an empty environment.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef COREPIPE_FORWARD_SOCKET
#define COREPIPE_FORWARD_SOCKET "/run/corepipe/forward.sock"
#endif
#ifndef COREPIPE_HANDLER
#define COREPIPE_HANDLER "/usr/local/bin/corepipe"
#endif

#define MAGIC "corepipe-forward 1\n"
#define MAX_MESSAGE 16384
#define ACK_SECONDS 5 /* forward.py's ACK_SECONDS: why 5 s is there */
/* The kernel's arguments after "collect [--config PATH]": 12, the pidfd (%F) the 10th (kernel.py's FIELDS). */
#define ARG_COUNT 12
#define PIDFD_AT 9

static int is_number(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 9)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* The pidfd named in the arguments (argv[2...]), or -1. */
static int pidfd_of(int argc, char **argv)
{
    int first = 2;
    if (argc >= 4 && strcmp(argv[2], "--config") == 0)
        first = 4;
    if (argc - first != ARG_COUNT || !is_number(argv[first + PIDFD_AT]))
        return -1;
    int fd = 0;
    for (const char *p = argv[first + PIDFD_AT]; *p; p++)
        fd = fd * 10 + (*p - '0');
    return fd;
}

/* 1 when the server took the crash, 0 when it is this process's to pass on. */
static int handoff(int argc, char **argv)
{
    static char message[MAX_MESSAGE];
    size_t used = sizeof MAGIC - 1;
    memcpy(message, MAGIC, used);
    for (int i = 2; i < argc; i++) {
        size_t n = strlen(argv[i]) + (i > 2);
        if (used + n > sizeof message)
            return 0;
        if (i > 2)
            message[used++] = '\0';
        memcpy(message + used, argv[i], strlen(argv[i]));
        used += strlen(argv[i]);
    }
    int fds[2] = {0, pidfd_of(argc, argv)};
    int nfds = fds[1] >= 0 ? 2 : 1;

    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return 0;
    struct timeval timeout = {ACK_SECONDS, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (sizeof COREPIPE_FORWARD_SOCKET > sizeof addr.sun_path)
        goto refused;
    memcpy(addr.sun_path, COREPIPE_FORWARD_SOCKET, sizeof COREPIPE_FORWARD_SOCKET);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        goto refused;

    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {message, used};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != (ssize_t)used)
        goto refused;
    char answer[256];
    ssize_t got = recv(sock, answer, sizeof answer, 0);
    if (got < 1 || answer[0] != 'A')
        goto refused;
    if (send(sock, "G", 1, MSG_NOSIGNAL) != 1)
        goto refused;
    close(sock);
    return 1;
refused:
    close(sock);
    return 0;
}

static void kernel_log(const char *line)
{
    int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)!write(fd, line, strlen(line));
        close(fd);
    }
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--show") == 0) {
        printf("socket %s\nhandler %s\n", COREPIPE_FORWARD_SOCKET, COREPIPE_HANDLER);
        return 0;
    }
    if (argc < 3 || strcmp(argv[1], "collect") != 0) {
        fprintf(stderr, "usage: %s collect [--config PATH] %%P %%p %%I %%u %%g %%s %%t %%c %%d %%F %%h %%e "
                        "(run by the kernel from kernel.core_pattern)\n", argv[0]);
        return 2;
    }
    if (handoff(argc, argv))
        return 0;
    /* No server took it: the Python handler collects it, with the same arguments and fds. */
    int pidfd = pidfd_of(argc, argv);
    if (pidfd >= 0)
        fcntl(pidfd, F_SETFD, 0);
    argv[0] = COREPIPE_HANDLER;
    execv(COREPIPE_HANDLER, argv);
    char line[512];
    snprintf(line, sizeof line, "<3>corepipe-forward: no corepipe serve at " COREPIPE_FORWARD_SOCKET
             " and no handler at " COREPIPE_HANDLER " (%s): the core of pid %s is dropped; start corepipe serve\n",
             strerror(errno), argc > (strcmp(argv[2], "--config") == 0 ? 4 : 2)
             ? argv[strcmp(argv[2], "--config") == 0 ? 4 : 2] : "?");
    kernel_log(line);
    return 1;
}
