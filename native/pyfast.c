/* pyfast.c -- shmstm._fast: the hot calls of shmstm/_stm.py, without cffi's
 * per-call cost (fast.h says why and what keeps it safe).
 *
 * Private to shmstm.  The functions take the addresses of a C context and of
 * a TVar's shmstm_ref as Python ints (shmstm/_stm.py takes them from its cffi
 * objects, which keep the memory alive); a wrong address crashes the process,
 * like any raw pointer, so nothing outside shmstm/_stm.py calls them.
 *
 *   bind(table)                 table: address of shmstm_fast_table(); once
 *   peek(ref) -> int            shmstm_peek
 *   readv(ctx, ref) -> int      shmstm_tx_readv
 *   commit(ctx, writes) -> int  stage the int values of the dict writes
 *                               ({handle: value}; other values were staged
 *                               before) and commit: shmstm_tx_commit_ints
 *   tx() -> obj or None         this thread's transaction object
 *   set_tx(obj or None)         (in the thread state's dict, which CPython
 *                               clears when the thread ends: a lookup there
 *                               costs a fraction of a threading.local's)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "fast.h"

static const struct shmstm_fast_table *T;   /* set once by bind() */

static void *addr_arg(PyObject *o)
{
    void *p = PyLong_AsVoidPtr(o);
    if (!p && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "shmstm._fast: null address");
    return p;
}

static int bound(void)
{
    if (T)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "shmstm._fast: bind() was not called");
    return 0;
}

static PyObject *fast_bind(PyObject *self, PyObject *arg)
{
    (void)self;
    const struct shmstm_fast_table *t = addr_arg(arg);
    if (!t)
        return NULL;
    if (t->abi != SHMSTM_FAST_ABI || t->size != sizeof *t ||
        t->gil_size != sizeof(struct shmstm_gil)) {
        PyErr_Format(PyExc_ImportError,
                     "shmstm._fast was built for fast ABI %d (%d/%d bytes) but the core "
                     "offers %u (%u/%u bytes): rebuild with 'pip install .'",
                     SHMSTM_FAST_ABI, (int)sizeof *t, (int)sizeof(struct shmstm_gil),
                     t->abi, t->size, t->gil_size);
        return NULL;
    }
    T = t;
    Py_RETURN_NONE;
}

static PyObject *fast_peek(PyObject *self, PyObject *arg)
{
    (void)self;
    const shmstm_ref *r = addr_arg(arg);
    if (!r || !bound())
        return NULL;
    return PyLong_FromLongLong(T->peek(r));
}

static void gil_release(struct shmstm_gil *g)
{
    g->state = PyEval_SaveThread();
}

static void gil_acquire(struct shmstm_gil *g)
{
    PyEval_RestoreThread((PyThreadState *)g->state);
}

static PyObject *fast_readv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "readv(ctx, ref) takes 2 arguments");
        return NULL;
    }
    shmstm_ctx *c = addr_arg(args[0]);
    if (!c)
        return NULL;
    const shmstm_ref *r = addr_arg(args[1]);
    if (!r || !bound())
        return NULL;
    struct shmstm_gil g = { gil_release, gil_acquire, NULL, 0 };
    return PyLong_FromLongLong(T->readv(c, r, &g));
}

#define STACK_PAIRS 32

static PyObject *fast_commit(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "commit(ctx, writes) takes a context and a dict");
        return NULL;
    }
    shmstm_ctx *c = addr_arg(args[0]);
    if (!c || !bound())
        return NULL;
    PyObject *writes = args[1];
    Py_ssize_t len = PyDict_GET_SIZE(writes);
    if (len > (Py_ssize_t)(UINT32_MAX / 2)) {
        PyErr_SetString(PyExc_OverflowError, "commit: too many writes");
        return NULL;
    }
    int64_t stack[2 * STACK_PAIRS];
    int64_t *pairs = stack;
    if (len > STACK_PAIRS) {
        pairs = PyMem_Malloc((size_t)len * 2 * sizeof *pairs);
        if (!pairs)
            return PyErr_NoMemory();
    }
    uint32_t n = 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    /* No Python code runs in this loop (exact ints only), so the dict cannot
     * change under it; the bound check is belt and braces. */
    while (PyDict_Next(writes, &pos, &k, &v) && (Py_ssize_t)n < len) {
        if (!PyLong_CheckExact(v))
            continue;                    /* not an int: staged by the caller */
        long long h = PyLong_CheckExact(k) ? PyLong_AsLongLong(k) : -1;
        long long x = h == -1 && PyErr_Occurred() ? 0 : PyLong_AsLongLong(v);
        if (!PyLong_CheckExact(k) && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "commit: a write handle is not an int");
        if (PyErr_Occurred()) {
            if (pairs != stack)
                PyMem_Free(pairs);
            /* No int was staged; the caller's non-int writes were, and the
             * caller's error path aborts the attempt (which drops them). */
            return NULL;
        }
        pairs[2 * n] = h;
        pairs[2 * n + 1] = x;
        n++;
    }
    struct shmstm_gil g = { gil_release, gil_acquire, NULL, 0 };
    int rc = T->commit_ints(c, pairs, n, &g);
    if (pairs != stack)
        PyMem_Free(pairs);
    return PyLong_FromLong(rc);
}

static PyObject *tx_key;                     /* "shmstm._fast.tx", interned */

static PyObject *fast_tx(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyObject *d = PyThreadState_GetDict();   /* borrowed; this thread's */
    PyObject *v = d ? PyDict_GetItemWithError(d, tx_key) : NULL;
    if (v) {
        Py_INCREF(v);
        return v;
    }
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *fast_set_tx(PyObject *self, PyObject *v)
{
    (void)self;
    PyObject *d = PyThreadState_GetDict();
    if (!d)
        Py_RETURN_NONE;     /* interpreter shutting down: tx() returns None, so each
                             * transaction makes a new object; nothing breaks */
    if (v != Py_None) {
        if (PyDict_SetItem(d, tx_key, v) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (PyDict_DelItem(d, tx_key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return NULL;
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", fast_bind, METH_O, "bind(table): the core's shmstm_fast_table() address"},
    {"peek", fast_peek, METH_O, "peek(ref) -> int: shmstm_peek"},
    {"readv", (PyCFunction)(void (*)(void))fast_readv, METH_FASTCALL,
     "readv(ctx, ref) -> int: shmstm_tx_readv"},
    {"commit", (PyCFunction)(void (*)(void))fast_commit, METH_FASTCALL,
     "commit(ctx, writes) -> int: stage the dict's int writes and commit"},
    {"tx", fast_tx, METH_NOARGS, "tx() -> this thread's transaction object, or None"},
    {"set_tx", fast_set_tx, METH_O, "set_tx(obj or None): set or clear it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmstm._fast",
    "shmstm's hot calls, holding the GIL (private; see native/fast.h).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    tx_key = PyUnicode_InternFromString("shmstm._fast.tx");
    if (!tx_key)
        return NULL;
    return PyModule_Create(&module);
}
