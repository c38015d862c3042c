/* A FUSE filesystem with one file, "blocker" (1 MiB), that answers its first open and reads of its first
 * page at once and never answers anything else: every later open, and every read past the first page,
 * waits until the server is killed. What a hostile container's FUSE server can do to a core handler.
 * Usage: fuse_blocker MOUNTPOINT (runs in the foreground, multithreaded, until killed). */
#define FUSE_USE_VERSION 31
#include <errno.h>
#include <fuse3/fuse.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SIZE (1 << 20)
#define PAGE 4096
static atomic_int opens;

static void forever(void) {
    for (;;) pause();
}

static int blocker_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    (void)fi;
    memset(st, 0, sizeof *st);
    if (strcmp(path, "/") == 0) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        return 0;
    }
    if (strcmp(path, "/blocker") == 0) {
        st->st_mode = S_IFREG | 0755;
        st->st_nlink = 1;
        st->st_size = SIZE;
        return 0;
    }
    return -ENOENT;
}

static int blocker_open(const char *path, struct fuse_file_info *fi) {
    if (strcmp(path, "/blocker") != 0) return -ENOENT;
    if (atomic_fetch_add(&opens, 1) > 0) forever();
    fi->keep_cache = 1;
    return 0;
}

static int blocker_read(const char *path, char *buf, size_t size, off_t offset, struct fuse_file_info *fi) {
    (void)path;
    (void)fi;
    if (offset >= PAGE) forever();
    memset(buf, 'F', size); /* all of what was asked: a short read would make the kernel shrink the file */
    return (int)size;
}

static void *blocker_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    (void)cfg;
    conn->max_readahead = 0; /* a fault reads its own page only: the second page stays unread */
    return NULL;
}

static const struct fuse_operations ops = {
    .init = blocker_init, .getattr = blocker_getattr, .open = blocker_open, .read = blocker_read,
};

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    char *args[] = {argv[0], "-f", argv[1], NULL};
    return fuse_main(3, args, &ops, NULL);
}
