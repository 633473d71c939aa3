/*
 * Retirement of trampoline images and replaced programs (src/reclaim/), as a Promela model for
 * spin. tests/model_check.rs runs it; tests/loom_reclaim.rs runs the real code under loom.
 *
 * Three scenarios, each with two threads that live twice (register, run, unregister, so threads
 * register and exit at any point of a retirement) and one retiring thread that attaches a second
 * program (the old one retires) and then detaches it (the second one retires):
 *   - traced (default): the runners go online (read_lock), fetch the patch site, and if it
 *     branches into an image take the image reference, run the original (possibly quiescent in a
 *     blocking helper), drop the reference, execute the epilogue, go offline. Images 1 then 2
 *     retire with grace period 1, drain, grace period 2, free.
 *   - -DFREPLACE: the site jumps to a replacement program installed with freplace (3, then 4):
 *     no reference; the replacement runs between going online and offline. Each replacement is
 *     freed after two grace periods.
 *   - -DNATIVE: one traced runner as above and one native caller (issue 11), a thread that is
 *     *not* in a read-side section when it executes the site. The site branches to a per-site entry stub, never freed while the
 *     site exists; the stub goes online (its epoch store is ordered towards the writer by the
 *     writer's membarrier), *then* reads which image to enter (5, then 6), takes the
 *     reference, may go quiescent while the original runs, drops the reference, runs the
 *     epilogue, and goes offline in the stub's own code. Images retire as traced ones do.
 *     The stub's image is data, and its load may be satisfied early, before the thread goes
 *     online (arm64 reorders loads; only compiler fences separate them): the early value stands
 *     unless a membarrier falls in between (it clears `early`), whose barrier makes the thread
 *     load it again. The retirer ends each unlink with a membarrier, as a poke does.
 *
 * A grace period reads the thread list (under its lock) after advancing the epoch and waits only
 * for the threads it found: threads register and exit at any point of a retirement.
 *
 * Every step a thread takes "inside" an image or replacement asserts it is not freed. spin
 * explores every interleaving. Memory is sequentially consistent here; the membarriers in the
 * real code are what give the readers' relaxed stores that behaviour towards the writer (see
 * src/reclaim/mod.rs and the soundness argument in tests/loom_reclaim.rs).
 *
 * Build-time switches that break the protocol (each must make spin find a violation):
 *   -DSKIP_GP1          free without the first grace period
 *   -DSKIP_DRAIN        free without waiting for the references
 *   -DSKIP_GP2          free without the second grace period
 *   -DSTALE_LIST        grace periods wait for the threads registered when the retirement began
 *                       (before the unlink) instead of reading the list after advancing the epoch
 *   -DFREPLACE_NO_GP    (with FREPLACE) free the replacement right after the site moves on
 *   -DNATIVE_READ_EARLY (with NATIVE) the stub reads the image before it goes online
 *   -DNO_UNLINK_MB      (with NATIVE) the unlink is a plain store, not followed by a membarrier:
 *                       grace period 1's first membarrier comes only after the epoch advanced
 * and one that must not: -DFREPLACE_ONE_GP (with FREPLACE) frees each replacement after a single
 * grace period, which suffices since nothing quiesces inside a replacement.
 */

#define NONE 0
#define THREADS 2
#define LIVES 2

byte site;                        /* the image (or replacement) the site leads to; 0 = none */
byte global_epoch = 1;
bool early[THREADS];              /* NATIVE: the stub's image load was satisfied early */

/* A membarrier: every thread executes a full barrier, which also ends early-satisfied loads. */
#ifdef NATIVE
#define MEMBARRIER atomic { early[0] = false; early[1] = false }
#else
#define MEMBARRIER skip
#endif
bool registered[THREADS];
byte rec_epoch[THREADS];          /* 0 = quiescent */
byte inside[THREADS];             /* image whose reference the thread holds; 0 = none */
bool freed[7];
bool listed[THREADS];             /* the thread list as a grace period read it */

/* The thread list, copied under its lock. */
inline read_list() {
    d_step {
        listed[0] = registered[0];
        listed[1] = registered[1]
    }
}

inline grace_period() {
    atomic { global_epoch++; target = global_epoch }
    MEMBARRIER;                       /* M1, then the list */
#ifndef STALE_LIST
    read_list();
#endif
    j = 0;
    do
    :: j < THREADS ->
        (!listed[j] || rec_epoch[j] == 0 || rec_epoch[j] >= target);
        j++
    :: else -> break
    od;
    MEMBARRIER                        /* M2 */
}

inline retire(img) {
#ifndef SKIP_GP1
    grace_period();
#endif
#ifndef SKIP_DRAIN
    (inside[0] != img && inside[1] != img);
#endif
#ifndef SKIP_GP2
    grace_period();
#endif
    freed[img] = true
}

/* A replaced program takes no references: only grace periods protect it. */
inline retire_replacement(img) {
#ifndef FREPLACE_NO_GP
    grace_period();
#ifndef FREPLACE_ONE_GP
    grace_period();
#endif
#endif
    freed[img] = true
}

/* With the reference on `img` held: the original runs, or blocks quiescent in a helper (the
 * reference covers it); then the rest of the image (fexit programs), drop the reference, and
 * the epilogue. */
inline run_image(me, img) {
    assert(!freed[img]);              /* entered the image, before the reference */
    inside[me] = img;                 /* image_enter */
    assert(!freed[img]);
    if
    :: skip                           /* the original runs */
    :: rec_epoch[me] = 0;             /* ... or blocks in a helper, quiescent */
       assert(!freed[img]);
       e = global_epoch;
       rec_epoch[me] = e
    fi;
    assert(!freed[img]);              /* back in the image: fexit programs */
    inside[me] = NONE;                /* image_exit */
    assert(!freed[img])               /* the epilogue after the drop */
}

proctype runner(byte me; bool native) {
    byte img;
    byte e;
    byte life = 0;
    do
    :: life < LIVES ->
        registered[me] = true;
        if
        :: !native ->
            /* read_lock: a relaxed load of the epoch, then a relaxed store */
            e = global_epoch;
            rec_epoch[me] = e;
            img = site;               /* the patch site */
            if
#ifdef FREPLACE
            :: img != NONE ->         /* the target program jumps to the replacement */
                assert(!freed[img]);  /* the replacement runs (no reference) */
                assert(!freed[img])   /* ... and returns */
#else
            :: img != NONE -> run_image(me, img)
#endif
            :: else -> skip
            fi
        :: else ->
            /* Offline, the thread executes the site: it branches to the entry stub, which is
             * never freed while the site exists. */
#ifdef NATIVE_READ_EARLY
            img = site;
            e = global_epoch;
            rec_epoch[me] = e;
#else
            if
            :: e = global_epoch;
               rec_epoch[me] = e;     /* the stub goes online ... */
               img = site             /* ... then reads which image to enter */
            :: atomic { img = site; early[me] = true };  /* ... or that load is satisfied early */
               e = global_epoch;
               rec_epoch[me] = e;
               if
               :: !early[me] -> img = site     /* a membarrier in between orders it */
               :: else -> early[me] = false
               fi
            fi;
#endif
            if
            :: img != NONE -> run_image(me, img)
            :: else -> skip           /* the stub calls the original directly */
            fi
        fi;
        rec_epoch[me] = 0;            /* read_unlock (native: in the stub's code) */
        registered[me] = false;       /* the thread exits */
        life++
    :: else -> break
    od
}

proctype retirer() {
    byte target;
    byte j;
#ifdef STALE_LIST
    read_list();                      /* the list as it was before the unlink */
#endif
#if defined(FREPLACE)
    /* replace the replacement: the site jumps to 4, replacement 3 retires */
    site = 4;
    retire_replacement(3);
    /* detach: the target program runs its own code again, replacement 4 retires */
    site = NONE;
    retire_replacement(4)
#elif defined(NATIVE)
    /* attach another program: the stub enters image 6, image 5 retires */
    site = 6;
#ifndef NO_UNLINK_MB
    MEMBARRIER;                       /* the poke's closing membarrier */
#endif
    retire(5);
    /* detach: the stub calls the original directly, image 6 retires */
    site = NONE;
#ifndef NO_UNLINK_MB
    MEMBARRIER;                       /* the poke's closing membarrier */
#endif
    retire(6)
#else
    /* attach another program: the site moves to image 2, image 1 retires */
    site = 2;
    retire(1);
    /* detach everything: the site goes back to nop, image 2 retires */
    site = NONE;
    retire(2)
#endif
}

init {
    atomic {
#if defined(FREPLACE)
        site = 3;
#elif defined(NATIVE)
        site = 5;
#else
        site = 1;
#endif
        run runner(0, false);
#ifdef NATIVE
        run runner(1, true);
#else
        run runner(1, false);
#endif
        run retirer()
    }
}
