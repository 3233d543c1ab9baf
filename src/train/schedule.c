/* Learning-rate schedule: linear warmup, cosine decay, constant floor. */
#include <math.h>

#include "train/train.h"

double schedule_lr(int64_t step, double lr, double min_lr, int64_t warmup, int64_t max_steps) {
    /* Warmup starts at lr/warmup rather than 0 so step 1 already learns. */
    if (warmup > 0 && step <= warmup) return lr * (double)step / (double)warmup;
    if (step >= max_steps) return min_lr;
    double progress = (double)(step - warmup) / (double)(max_steps - warmup);
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + cos(M_PI * progress));
}
