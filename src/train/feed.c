/* The batch feed of training: loader ring -> model_stage (see train.h). */
#include "train/train.h"

void feed_init(tlm_feed *f, tlm_loader *l, tlm_model *m, int prefetch) {
    f->loader = l;
    f->model = m;
    f->keep = prefetch >= 2 ? 1 : 0;
    f->nheld = 0;
}

void feed_release(tlm_feed *f, int keep) {
    while (f->nheld > 0) {
        if (!model_stage_done(f->model, f->held[0].ticket, f->nheld > keep)) break;
        loader_release(f->loader, &f->held[0].b);
        f->held[0] = f->held[1];
        f->nheld--;
    }
}

int feed_next(tlm_feed *f, int B, int T) {
    /* at most `keep` batches still uploading, so the ring has a slot free */
    feed_release(f, f->keep);
    tlm_batch b;
    if (loader_next(f->loader, &b)) return -1;
    int64_t ticket = model_stage(f->model, b.inputs, b.targets, B, T);
    if (ticket < 0) {
        loader_release(f->loader, &b);
        return -1;
    }
    f->held[f->nheld].b = b;
    f->held[f->nheld].ticket = ticket;
    f->nheld++;
    return 0;
}
