/* fault.c -- fault injection for debug builds (compiled to nothing otherwise).
 *
 * SHMSTM_FAULT=<point>:<n>   raise SIGKILL on ourselves at the n-th time the
 *                            named point is reached (crash tests)
 * SHMSTM_DELAY=<permille>    sched_yield at marked points with that chance
 *                            (liburcu's DEBUG_YIELD), to widen race windows
 */
#define _GNU_SOURCE
#include "core.h"

#ifdef SHMSTM_DEBUG
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void fault_point(const char *name)
{
    static int init;
    static char point[64];
    static long countdown = -1;
    static int delay_permille;
    if (!init) {
        init = 1;
        const char *f = getenv("SHMSTM_FAULT");
        if (f) {
            const char *colon = strchr(f, ':');
            size_t n = colon ? (size_t)(colon - f) : strlen(f);
            if (n >= sizeof point)
                n = sizeof point - 1;
            memcpy(point, f, n);
            countdown = colon ? atol(colon + 1) : 1;
        }
        const char *d = getenv("SHMSTM_DELAY");
        delay_permille = d ? atoi(d) : 0;
    }
    if (delay_permille && rand() % 1000 < delay_permille)
        sched_yield();
    if (countdown > 0 && strcmp(point, name) == 0 && --countdown == 0)
        kill(getpid(), SIGKILL);
}
#else
typedef int shmstm_fault_unused_;   /* keep the unit non-empty (ISO C) */
#endif
