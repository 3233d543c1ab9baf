/* metrics.jsonl (one JSON object per logged step) and loss.svg. The whole
 * file is rewritten atomically from memory, so it always matches a step the
 * trainer reached; resume trims it back to the checkpoint's step. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/fileio.h"
#include "io/plot.h"
#include "train/train.h"

int metrics_add(tlm_trainer *t, const tlm_metric *r) {
    if (t->nmetrics == t->cap_metrics) {
        size_t cap = t->cap_metrics ? 2 * t->cap_metrics : 256;
        tlm_metric *p = realloc(t->metrics, cap * sizeof *p);
        if (!p) return tlm_errorf("out of memory recording metrics");
        t->metrics = p;
        t->cap_metrics = cap;
    }
    t->metrics[t->nmetrics++] = *r;
    return 0;
}

/* Losses with %.9g: enough digits that a float loss reads back exactly. */
static int format_record(char *buf, size_t n, const tlm_metric *r) {
    int k = snprintf(buf, n, "{\"step\": %lld, \"tokens\": %llu, \"loss\": %.9g", (long long)r->step,
                     (unsigned long long)r->tokens, r->loss);
    if (isfinite(r->val_loss)) k += snprintf(buf + k, n - (size_t)k, ", \"val_loss\": %.9g", r->val_loss);
    k += snprintf(buf + k, n - (size_t)k,
                  ", \"lr\": %.9g, \"tokens_per_s\": %.1f, \"elapsed_s\": %.3f, \"grad_norm\": %.9g}\n", r->lr,
                  r->tokens_per_s, r->elapsed_s, isfinite(r->grad_norm) ? r->grad_norm : -1.0);
    return k;
}

static int write_jsonl(const tlm_trainer *t, const char *path) {
    size_t cap = 512 * (t->nmetrics + 1), len = 0;
    char *buf = malloc(cap);
    if (!buf) return tlm_errorf("out of memory writing %s", path);
    for (size_t i = 0; i < t->nmetrics; i++) len += (size_t)format_record(buf + len, cap - len, &t->metrics[i]);
    int rc = file_write_atomic(path, buf, len);
    free(buf);
    return rc;
}

static int write_svg(const tlm_trainer *t, const char *path) {
    size_t n = t->nmetrics;
    double *tx = malloc((n + 1) * sizeof(double)), *ty = malloc((n + 1) * sizeof(double));
    double *vx = malloc((n + 1) * sizeof(double)), *vy = malloc((n + 1) * sizeof(double));
    int rc = -1;
    if (!tx || !ty || !vx || !vy) {
        tlm_errorf("out of memory writing %s", path);
        goto done;
    }
    /* Exponential moving average with bias correction, so the first points
     * are not pulled towards zero. */
    double ema = 0, w = 0, beta = 0.9;
    size_t nv = 0;
    for (size_t i = 0; i < n; i++) {
        const tlm_metric *r = &t->metrics[i];
        ema = beta * ema + (1 - beta) * r->loss;
        w = beta * w + (1 - beta);
        tx[i] = (double)r->tokens;
        ty[i] = ema / w;
        if (isfinite(r->val_loss)) {
            vx[nv] = (double)r->tokens;
            vy[nv] = r->val_loss;
            nv++;
        }
    }
    tlm_series s[2] = {{"train (smoothed)", tx, ty, n, "#1f77b4"}, {"val", vx, vy, nv, "#d62728"}};
    rc = plot_write_svg(path, "tinylm training loss", "tokens seen", "loss", s, nv ? 2 : 1);
done:
    free(tx);
    free(ty);
    free(vx);
    free(vy);
    return rc;
}

int metrics_write(const tlm_trainer *t) {
    char path[1200];
    if (write_jsonl(t, path_join(path, sizeof path, t->opt.out, "metrics.jsonl"))) return -1;
    if (t->nmetrics == 0) return 0;
    return write_svg(t, path_join(path, sizeof path, t->opt.out, "loss.svg"));
}

static double num_field(const cJSON *j, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

int metrics_load(tlm_trainer *t, int64_t max_step) {
    char path[1200];
    path_join(path, sizeof path, t->opt.out, "metrics.jsonl");
    t->nmetrics = 0;
    if (!path_exists(path)) return 0;
    size_t len;
    char *text = file_read_all(path, &len);
    if (!text) return -1;
    int rc = 0;
    /* The history is informational: a line that does not parse is skipped
     * rather than blocking the resume. */
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = '\0';
        cJSON *j = cJSON_Parse(line);
        if (!cJSON_IsObject(j)) {
            cJSON_Delete(j);
            continue;
        }
        tlm_metric r;
        double step = num_field(j, "step"), tokens = num_field(j, "tokens");
        r.loss = num_field(j, "loss");
        r.val_loss = num_field(j, "val_loss");
        r.lr = num_field(j, "lr");
        r.tokens_per_s = num_field(j, "tokens_per_s");
        r.elapsed_s = num_field(j, "elapsed_s");
        r.grad_norm = num_field(j, "grad_norm");
        cJSON_Delete(j);
        if (!isfinite(step) || !isfinite(tokens) || step > (double)max_step) continue;
        r.step = (int64_t)step;
        r.tokens = (uint64_t)tokens;
        if ((rc = metrics_add(t, &r))) break;
    }
    free(text);
    return rc;
}
