/* pyfast.c -- shmstm._fast: the hot calls of shmstm/stm/ (tx.py,
 * tvar.py), without cffi's
 * per-call cost (fast.h says why and what keeps it safe).
 *
 * Private to shmstm.  The functions take the addresses of a C context and of
 * a TVar's shmstm_ref as Python ints (shmstm/stm/ takes them from its cffi
 * objects, which keep the memory alive); a wrong address crashes the process,
 * like any raw pointer, so nothing outside shmstm/stm/ and shmstm/shm/ calls them.
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
 *   call(tx, active, fn, a, kw) fn(*a, **kw) with tx.running set (and tx in
 *                               the set active) for the call's length only
 *   busy(tx, fn, a)             fn(*a) with tx.busy set for the call's length
 *   Ctx                         the owner of one C context (one process slot)
 *   detach(box)                 take the segment out of its box and unmap it
 *
 * Why the owned resources are here: an asynchronous exception (a signal
 * handler that raises, KeyboardInterrupt, PyThreadState_SetAsyncExc) lands
 * between any two bytecodes.  A context freed by one cffi call and marked
 * free by the next bytecode could be freed twice (another owner's slot) or
 * never.  Here each take and each give-back is one C call that runs no Python
 * code, and the object that owns a context gives it back when it dies, so it
 * is given back exactly once whatever interrupts its owner.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
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

/* ---- Ctx: the owner of a C context ----
 *
 * claim(seg) takes a context (a process slot) of the segment at address seg
 * and returns 0 or the core's error code; release() gives it back; so does
 * the object's death (a context lost to an asynchronous exception, or left by
 * a thread that ended).  Python keeps its cffi views of the context in ptr,
 * out and outf, which release() clears in the same call.  addr is the
 * context's address (0 once released).  A fork child's copy gives nothing
 * back (the core checks the pid): the slot is the parent's. */
typedef struct {
    PyObject_HEAD
    shmstm_ctx *c;
    PyObject *ptr, *out, *outf;
} CtxObject;

static void ctx_drop(CtxObject *o)
{
    shmstm_ctx *c = o->c;
    PyObject *a = o->ptr, *b = o->out, *d = o->outf;
    o->c = NULL;
    o->ptr = o->out = o->outf = NULL;
    if (c)
        T->ctx_free(c);         /* no Python code runs in it */
    /* cffi views: their deallocation runs no Python code either. */
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(d);
}

static void ctx_dealloc(CtxObject *o)
{
    ctx_drop(o);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *ctx_claim(CtxObject *o, PyObject *arg)
{
    shmstm_seg *s = addr_arg(arg);
    if (!s || !bound())
        return NULL;
    if (o->c) {
        PyErr_SetString(PyExc_RuntimeError, "shmstm._fast.Ctx: already holds a context");
        return NULL;
    }
    shmstm_ctx *c = NULL;
    int rc;
    /* A claim may recover dead processes' slots: without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    rc = T->ctx_new(s, &c);
    Py_END_ALLOW_THREADS
    if (rc == 0)
        o->c = c;
    return PyLong_FromLong(rc);
}

static PyObject *ctx_release(CtxObject *o, PyObject *unused)
{
    (void)unused;
    ctx_drop(o);
    Py_RETURN_NONE;
}

static PyObject *ctx_addr(CtxObject *o, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(o->c);
}

static PyMethodDef ctx_methods[] = {
    {"claim", (PyCFunction)ctx_claim, METH_O, "claim(seg) -> 0 or SHMSTM_E*: take a context"},
    {"release", (PyCFunction)ctx_release, METH_NOARGS, "give the context back (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef ctx_members[] = {
    {"ptr", T_OBJECT, offsetof(CtxObject, ptr), 0, "cffi view (shmstm_ctx *); None once released"},
    {"out", T_OBJECT, offsetof(CtxObject, out), 0, "cffi view of the context's out words"},
    {"outf", T_OBJECT, offsetof(CtxObject, outf), 0, "cffi view of out as doubles"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef ctx_getset[] = {
    {"addr", (getter)ctx_addr, NULL, "the context's address; 0 once released", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CtxType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmstm._fast.Ctx",
    .tp_basicsize = sizeof(CtxObject),
    .tp_dealloc = (destructor)ctx_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The owner of one C context (a process slot): see native/pyfast.c.",
    .tp_methods = ctx_methods,
    .tp_members = ctx_members,
    .tp_getset = ctx_getset,
    .tp_new = PyType_GenericNew,
};

static PyObject *fast_detach(PyObject *self, PyObject *arg)
{
    (void)self;
    shmstm_seg **box = addr_arg(arg);
    if (!box || !bound())
        return NULL;
    shmstm_seg *s = *box;
    *box = NULL;
    if (s)
        T->seg_detach(s);
    Py_RETURN_NONE;
}

/* call(tx, active, fn, args, kwargs): fn(*args, **kwargs) with tx.running
 * set and tx in the set active for the length of the call.  The flag and the
 * set are the hot path's "am I in a transaction" (shmstm/stm/): set in
 * Python, an asynchronous exception landing in the cleanup would leave them
 * set, and the thread's next atomically() would take itself for a nested
 * one and never commit.  Here they are undone in C after the call returns,
 * where no Python code can run. */
static PyObject *s_running;                  /* "running", interned */

static PyObject *fast_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5 || !PySet_Check(args[1]) || !PyTuple_Check(args[3]) ||
        (args[4] != Py_None && !PyDict_Check(args[4]))) {
        PyErr_SetString(PyExc_TypeError, "call(tx, active, fn, args, kwargs)");
        return NULL;
    }
    PyObject *tx = args[0], *active = args[1];
    if (PySet_Add(active, tx) < 0)
        return NULL;
    if (PyObject_SetAttr(tx, s_running, Py_True) < 0) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PySet_Discard(active, tx);
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    PyObject *kw = args[4] == Py_None ? NULL : args[4];
    PyObject *r = PyObject_Call(args[2], args[3], kw);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    /* Neither can fail for shmstm's _Tx (a __slots__ attribute, identity hash). */
    if (PyObject_SetAttr(tx, s_running, Py_False) < 0)
        PyErr_Clear();
    if (PySet_Discard(active, tx) < 0)
        PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    return r;
}

/* busy(tx, fn, args): fn(*args) with tx.busy set for the length of the
 * call: the whole transaction loop (shmstm/stm/tx.py, _run), so that a
 * transaction started on the same thread meanwhile (a signal handler, a
 * finalizer) knows that this thread's context is in use.  Cleared in C, like
 * running (call above). */
static PyObject *s_busy;                     /* "busy", interned */

static PyObject *fast_busy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "busy(tx, fn, args)");
        return NULL;
    }
    PyObject *tx = args[0];
    if (PyObject_SetAttr(tx, s_busy, Py_True) < 0)
        return NULL;
    PyObject *r = PyObject_Call(args[1], args[2], NULL);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (PyObject_SetAttr(tx, s_busy, Py_False) < 0)     /* a __slots__ attribute: cannot fail */
        PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    return r;
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
    {"call", (PyCFunction)(void (*)(void))fast_call, METH_FASTCALL,
     "call(tx, active, fn, args, kwargs): fn(*args, **kwargs) with tx.running set"},
    {"busy", (PyCFunction)(void (*)(void))fast_busy, METH_FASTCALL,
     "busy(tx, fn, args): fn(*args) with tx.busy set"},
    {"detach", fast_detach, METH_O, "detach(box): take the segment out of the box and unmap it"},
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
    s_running = PyUnicode_InternFromString("running");
    s_busy = PyUnicode_InternFromString("busy");
    if (!tx_key || !s_running || !s_busy)
        return NULL;
    if (PyType_Ready(&CtxType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CtxType);
    if (PyModule_AddObject(m, "Ctx", (PyObject *)&CtxType) < 0) {
        Py_DECREF(&CtxType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
