/* fault.c -- fault injection for debug builds (compiled to nothing otherwise).
 *
 * Three switches, in the spirit of GHC's SHAKE and liburcu's DEBUG_YIELD:
 *
 *   kill points   FAULT_POINT("name") raises SIGKILL on ourselves at the n-th
 *                 time the armed point is reached (crash tests).  Every
 *                 numbered step of commit (txn.c) and recovery (proc.c) has one.
 *   delays        at every fault point, with a chance of <permille>/1000,
 *                 sched_yield (max_us == 0) or sleep a random 1..max_us
 *                 microseconds: widens race windows, and makes a commit last
 *                 long enough for a test to SIGSTOP/SIGKILL it in the middle.
 *   shake         FAULT_SHAKE() is true with a chance of <permille>/1000: read
 *                 and commit validation then fail spuriously, driving the
 *                 abort paths (commit rollback after locking) hard.
 *
 * Configuration: the environment, read at the first fault point of a process
 *   SHMSTM_FAULT=<point>:<n>        kill at the n-th hit of <point>
 *   SHMSTM_FAULT=<point>:<n>:stop   SIGSTOP ourselves there instead (a test
 *                                   stalls a process mid-commit, then SIGCONTs it)
 *   SHMSTM_DELAY=<permille>[:<max_us>]
 *   SHMSTM_SHAKE=<permille>
 *   SHMSTM_FAULT_LOG=<path>         before a kill, append "<pid> <point>\n"
 *                                   (one write(2), O_APPEND: lines never mix)
 * or shmstm_fault_set() (tests arm forked children without touching the
 * environment).  In a release build shmstm_fault_set() returns SHMSTM_EINVAL
 * and FAULT_POINT / FAULT_SHAKE are constants: nothing is compiled in.
 *
 * The state is process-local; a fork child re-seeds its generator (it would
 * otherwise replay its parent's random choices).
 */
#define _GNU_SOURCE
#include "core.h"

#ifdef SHMSTM_DEBUG
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static struct {
    int init;
    char point[64];
    long countdown;          /* > 0: armed */
    int stop;                /* at the point: SIGSTOP (1) instead of SIGKILL (0) */
    int delay_permille;
    int delay_max_us;
    int shake_permille;
    int log_fd;              /* -1: no log */
    pid_t pid;               /* owner of rnd: re-seed after fork */
    uint64_t rnd;
} F = {.log_fd = -1};

static void set_point(const char *spec)
{
    F.point[0] = '\0';
    F.countdown = 0;
    if (!spec || !*spec)
        return;
    const char *colon = strchr(spec, ':');
    size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
    if (n >= sizeof F.point)
        n = sizeof F.point - 1;
    memcpy(F.point, spec, n);
    F.point[n] = '\0';
    F.countdown = colon ? atol(colon + 1) : 1;
    const char *action = colon ? strchr(colon + 1, ':') : NULL;
    F.stop = action && strcmp(action + 1, "stop") == 0;
}

static void init_from_env(void)
{
    F.init = 1;
    set_point(getenv("SHMSTM_FAULT"));
    const char *d = getenv("SHMSTM_DELAY");
    if (d) {
        F.delay_permille = atoi(d);
        const char *colon = strchr(d, ':');
        F.delay_max_us = colon ? atoi(colon + 1) : 0;
    }
    const char *s = getenv("SHMSTM_SHAKE");
    F.shake_permille = s ? atoi(s) : 0;
    const char *log = getenv("SHMSTM_FAULT_LOG");
    if (log && *log)
        F.log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

static uint32_t rnd(void)
{
    pid_t me = getpid();
    if (F.pid != me) {
        F.pid = me;
        F.rnd = ((uint64_t)me << 32) ^ now_ns() ^ 0x9e3779b97f4a7c15ull;
        if (!F.rnd)
            F.rnd = 1;
    }
    /* xorshift64* */
    F.rnd ^= F.rnd >> 12;
    F.rnd ^= F.rnd << 25;
    F.rnd ^= F.rnd >> 27;
    return (uint32_t)((F.rnd * 2685821657736338717ull) >> 32);
}

void fault_point(const char *name)
{
    if (!F.init)
        init_from_env();
    if (F.delay_permille && (int)(rnd() % 1000) < F.delay_permille) {
        if (F.delay_max_us > 0) {
            long us = 1 + (long)(rnd() % (uint32_t)F.delay_max_us);
            struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        } else {
            sched_yield();
        }
    }
    if (F.countdown > 0 && strcmp(F.point, name) == 0 && --F.countdown == 0) {
        if (F.log_fd >= 0) {
            char line[96];
            int n = snprintf(line, sizeof line, "%d %s\n", (int)getpid(), name);
            if (n > 0 && write(F.log_fd, line, (size_t)n) < 0) {
                /* nothing to do: the kill below is what matters */
            }
        }
        kill(getpid(), F.stop ? SIGSTOP : SIGKILL);
    }
}

int fault_shake(void)
{
    if (!F.init)
        init_from_env();
    return F.shake_permille && (int)(rnd() % 1000) < F.shake_permille;
}

int shmstm_fault_set(const char *point, int64_t countdown, int32_t delay_permille,
                     int32_t delay_max_us, int32_t shake_permille)
{
    if (!F.init)
        init_from_env();
    if (F.log_fd < 0) {       /* the environment may have changed since init */
        const char *log = getenv("SHMSTM_FAULT_LOG");
        if (log && *log)
            F.log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    }
    set_point(point);
    if (point && *point && !strchr(point, ':'))
        F.countdown = countdown;
    F.delay_permille = delay_permille;
    F.delay_max_us = delay_max_us;
    F.shake_permille = shake_permille;
    return 0;
}
#else
int shmstm_fault_set(const char *point, int64_t countdown, int32_t delay_permille,
                     int32_t delay_max_us, int32_t shake_permille)
{
    (void)point;
    (void)countdown;
    (void)delay_permille;
    (void)delay_max_us;
    (void)shake_permille;
    return SHMSTM_EINVAL;     /* release build: no fault injection compiled in */
}
#endif
