/* cases.h -- the frame shared by the C case programs of tests/native: a
 * private segment (created by case_segment, removed by case_done or by the
 * first failed CHECK), and CHECK, which prints "FAIL <what>" and exits 1. */
#ifndef SHMSTM_TEST_CASES_H
#define SHMSTM_TEST_CASES_H

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core.h"

static char case_name[64];

static void fail(const char *what)
{
    fprintf(stderr, "FAIL %s\n", what);
    shm_unlink(case_name);
    exit(1);
}

#define CHECK(c, what) do { if (!(c)) fail(what); } while (0)

/* A fresh segment /shmstm-<tag>-<pid>: 64 TVars, 4 slots, a 64 KiB heap. */
static shmstm_seg *case_segment(const char *tag)
{
    snprintf(case_name, sizeof case_name, "/shmstm-%s-%d", tag, (int)getpid());
    int fd = shm_open(case_name, O_RDWR | O_CREAT | O_EXCL, 0600);
    CHECK(fd >= 0, "shm_open");
    shmstm_params p = {0};
    p.max_tvars = 64; p.max_procs = 4; p.max_value_size = 1024; p.heap_size = 1 << 16;
    shmstm_seg *s;
    CHECK(shmstm_seg_create(fd, &p, &s) == 0, "create");
    close(fd);
    return s;
}

static void case_done(shmstm_seg *s)
{
    shmstm_seg_detach(s);
    shm_unlink(case_name);
}

#endif
