/*
 * Retirement of a trampoline image (src/reclaim.rs), as a Promela model for spin.
 *
 * Two runner threads run the traced program in a loop: go online (read_lock), fetch the patch site,
 * and if it branches into an image: take the image reference, run the original (possibly
 * quiescent in a blocking helper), drop the reference, execute the epilogue, go offline.
 * One retiring thread replaces image 1 by image 2, then unlinks image 2, retiring each with
 * grace period 1, reference drain, grace period 2, then frees it.
 *
 * Every step a runner takes "inside" an image asserts the image is not freed. spin explores every
 * interleaving. Memory is sequentially consistent here; the membarriers in the real code are what
 * give the readers' relaxed stores that behaviour towards the writer (see src/reclaim.rs).
 *
 * Build-time switches to show the model catches broken protocols (each must find a violation):
 *   -DSKIP_GP1   free without the first grace period
 *   -DSKIP_DRAIN free without waiting for the references
 *   -DSKIP_GP2   free without the second grace period
 */

#define RUNNERS 2
#define RUNS 2
#define NONE 0

byte site = 1;                /* image the patch site branches into; 0 = nop */
byte global_epoch = 1;
byte rec_epoch[RUNNERS];      /* 0 = quiescent */
byte inside[RUNNERS];         /* image whose reference the runner holds; 0 = none */
bool freed[3];
byte done_runners = 0;

inline grace_period() {
    byte target;
    byte j;
    atomic { global_epoch++; target = global_epoch; }
    j = 0;
    do
    :: j < RUNNERS ->
        (rec_epoch[j] == 0 || rec_epoch[j] >= target);
        j++
    :: else -> break
    od
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

proctype runner(byte me) {
    byte img;
    byte n = 0;
    byte e;
    do
    :: n < RUNS ->
        /* read_lock: a relaxed load of the epoch, then a relaxed store */
        e = global_epoch;
        rec_epoch[me] = e;
        /* the patch site */
        img = site;
        if
        :: img != NONE ->
            assert(!freed[img]);          /* entered the image, before the reference */
            inside[me] = img;             /* image_enter */
            assert(!freed[img]);
            if
            :: skip                       /* the original runs */
            :: rec_epoch[me] = 0;         /* ... or blocks in a helper, quiescent */
               assert(!freed[img]);
               e = global_epoch;
               rec_epoch[me] = e
            fi;
            assert(!freed[img]);          /* back in the image: fexit programs */
            inside[me] = NONE;            /* image_exit */
            assert(!freed[img])           /* the epilogue after the drop */
        :: else -> skip
        fi;
        rec_epoch[me] = 0;                /* read_unlock */
        n++
    :: else -> break
    od;
    done_runners++
}

proctype retirer() {
    /* attach another program: the site moves to image 2, image 1 retires */
    site = 2;
    retire(1);
    /* detach everything: the site goes back to nop, image 2 retires */
    site = NONE;
    retire(2)
}

init {
    atomic {
        run runner(0);
        run runner(1);
        run retirer()
    }
}
