/*
 * Token sampling on the host: temperature, top-k, top-p (nucleus).
 *
 * Cost per draw is O(V) plus only the ordering the filters need:
 *  - top-k: a size-k min-heap selects the k best in O(V log k), then those
 *    k are heap-sorted (O(k log k)); the vocabulary is never sorted.
 *  - top-p without top-k: a max-heap over V (built in O(V)) is popped only
 *    until the nucleus mass is reached, O(V + m log V) for a nucleus of m.
 * Candidates are totally ordered by (probability desc, id asc), so the
 * nucleus is well defined even with ties and every backend agrees.
 */
#include <math.h>
#include <string.h>

#include "infer/infer.h"

int sampler_check_params(const tlm_sampler_params *p) {
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return tlm_errorf("--temperature %g is invalid: use 0 (greedy) or a positive number", p->temperature);
    if (p->top_k < 0) return tlm_errorf("--top-k %d is invalid: use 0 (off) or a positive count", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return tlm_errorf("--top-p %g is invalid: use a value in (0, 1] (1 = off)", p->top_p);
    return 0;
}

int sampler_init(tlm_sampler *s, int V, const tlm_sampler_params *p) {
    memset(s, 0, sizeof *s);
    if (sampler_check_params(p)) return -1;
    if (V < 1) return tlm_errorf("sampler: vocabulary size %d must be positive", V);
    s->p = *p;
    s->V = V;
    s->idx = tlm_alloc((size_t)V * sizeof *s->idx);
    s->prob = tlm_alloc((size_t)V * sizeof *s->prob);
    if (!s->idx || !s->prob) {
        sampler_free(s);
        return -1;
    }
    return 0;
}

void sampler_free(tlm_sampler *s) {
    tlm_free(s->idx);
    tlm_free(s->prob);
    s->idx = NULL;
    s->prob = NULL;
}

int32_t sampler_argmax(const float *logits, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* ---- top-k: keep the k best ids by logit -------------------------------- */

/* Is id a strictly better than id b? Higher logit, ties to the lower id. */
static inline int logit_better(const float *lg, int32_t a, int32_t b) {
    return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
}

/* Min-heap on "better": the root is the worst of the kept ids. */
static void worst_heap_down(const float *lg, int32_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && logit_better(lg, h[w], h[l])) w = l;
        if (r < n && logit_better(lg, h[w], h[r])) w = r;
        if (w == i) return;
        int32_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* idx[0..k) = the k best ids of lg[V], best first. */
static void select_top_k(const float *lg, int V, int k, int32_t *idx) {
    for (int i = 0; i < k; i++) idx[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--) worst_heap_down(lg, idx, k, i);
    for (int i = k; i < V; i++) {
        if (logit_better(lg, i, idx[0])) {
            idx[0] = i;
            worst_heap_down(lg, idx, k, 0);
        }
    }
    /* Heap sort: the worst goes to the back each round, so the array ends
     * up best first. */
    for (int n = k - 1; n > 0; n--) {
        int32_t t = idx[0];
        idx[0] = idx[n];
        idx[n] = t;
        worst_heap_down(lg, idx, n, 0);
    }
}

/* ---- top-p: pop the most likely candidates until the mass is reached ---- */

static inline int prob_better(const float *p, const int32_t *id, int a, int b) {
    return p[a] > p[b] || (p[a] == p[b] && id[a] < id[b]);
}

static inline void swap_pair(float *p, int32_t *id, int a, int b) {
    float tp = p[a];
    p[a] = p[b];
    p[b] = tp;
    int32_t ti = id[a];
    id[a] = id[b];
    id[b] = ti;
}

/* Max-heap on (prob, id) over positions 0..n-1 of the parallel arrays. */
static void best_heap_down(float *p, int32_t *id, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, b = i;
        if (l < n && prob_better(p, id, l, b)) b = l;
        if (r < n && prob_better(p, id, r, b)) b = r;
        if (b == i) return;
        swap_pair(p, id, i, b);
        i = b;
    }
}

/* Reorders p/id[0..n) so the nucleus (mass >= target) sits at the back,
 * most likely at n-1; returns its first position and its mass in *mass. */
static int nucleus_by_heap(float *p, int32_t *id, int n, double target, double *mass) {
    for (int i = n / 2 - 1; i >= 0; i--) best_heap_down(p, id, n, i);
    double cum = 0;
    int heap = n;
    while (heap > 0) {
        swap_pair(p, id, 0, heap - 1);
        heap--;
        cum += p[heap];
        if (cum >= target) break;
        best_heap_down(p, id, heap, 0);
    }
    *mass = cum;
    return heap;
}

int32_t sampler_sample(tlm_sampler *s, const float *logits, tlm_rng *rng) {
    const int V = s->V;
    const tlm_sampler_params *p = &s->p;
    if (p->temperature == 0.0f || p->top_k == 1) return sampler_argmax(logits, V);

    int32_t *idx = s->idx;
    float *prob = s->prob;
    int n;
    float mx;
    int sorted;
    if (p->top_k > 0 && p->top_k < V) {
        n = p->top_k;
        select_top_k(logits, V, n, idx);
        mx = logits[idx[0]];
        sorted = 1;
    } else {
        n = V;
        mx = logits[0];
        for (int i = 0; i < V; i++) {
            idx[i] = i;
            if (logits[i] > mx) mx = logits[i];
        }
        sorted = 0;
    }

    /* exp((l - max) / T): the max subtraction keeps every term in (0, 1]. */
    const float invT = 1.0f / p->temperature;
    double sum = 0;
    for (int j = 0; j < n; j++) {
        prob[j] = expf((logits[idx[j]] - mx) * invT);
        sum += prob[j];
    }

    int lo = 0, hi = n; /* candidates are positions lo..hi-1 */
    double mass = sum;
    if (p->top_p < 1.0f) {
        double target = (double)p->top_p * sum;
        if (sorted) {
            double cum = 0;
            int m = 0;
            while (m < n) {
                cum += prob[m++];
                if (cum >= target) break;
            }
            hi = m;
            mass = cum;
        } else {
            lo = nucleus_by_heap(prob, idx, n, target, &mass);
        }
    }

    /* Inverse CDF with one uniform; rounding can leave r just past the
     * last bucket, which then takes it. */
    double r = (double)tlm_rng_uniform(rng) * mass;
    double cum = 0;
    for (int j = lo; j < hi; j++) {
        cum += prob[j];
        if (r < cum) return idx[j];
    }
    return idx[hi - 1];
}
