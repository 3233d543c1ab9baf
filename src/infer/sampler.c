/*
 * Token sampling on the host: temperature, top-k, top-p (nucleus).
 *
 * Cost per draw is O(V) plus only the ordering the filters need:
 *  - top-k: a size-k min-heap selects the k best in O(V log k), then those
 *    k are heap-sorted (O(k log k)); the vocabulary is never sorted.
 *  - top-p without top-k: histograms of the probability mass over buckets
 *    of the probabilities' float bits (monotonic in the probability) find
 *    where the nucleus ends; only the few tokens of the last sub-bucket are
 *    sorted. The draw then walks the nucleus in id order. O(V)
 *    plus a sort of a few tokens: at 64 streams x 2560 tokens per step the
 *    sampler must not cost more than the model.
 * Candidates are totally ordered by (probability desc, id asc), so the
 * nucleus is well defined even with ties and every backend agrees.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"
#include "util/fastexp.h"

#define SAMPLER_BUCKETS 256 /* sub-buckets of nucleus_threshold */

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
    s->hist = tlm_alloc(SAMPLER_BUCKETS * sizeof *s->hist);
    if (!s->idx || !s->prob || !s->hist) {
        sampler_free(s);
        return -1;
    }
    return 0;
}

void sampler_free(tlm_sampler *s) {
    tlm_free(s->idx);
    tlm_free(s->prob);
    tlm_free(s->hist);
    s->idx = NULL;
    s->prob = NULL;
    s->hist = NULL;
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

/* ---- top-p without top-k: a histogram over probability buckets ------- */

static inline int prob_better(const float *p, int32_t a, int32_t b) {
    return p[a] > p[b] || (p[a] == p[b] && a < b);
}

/* Max-heap on "worse" used to sort ids best first (heap sort). */
static void sort_heap_down(const float *p, int32_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && prob_better(p, h[w], h[l])) w = l;
        if (r < n && prob_better(p, h[w], h[r])) w = r;
        if (w == i) return;
        int32_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* ids[0..n) sorted by (p desc, id asc). */
static void sort_by_prob(const float *p, int32_t *ids, int n) {
    for (int i = n / 2 - 1; i >= 0; i--) sort_heap_down(p, ids, n, i);
    for (int k = n - 1; k > 0; k--) {
        int32_t t = ids[0];
        ids[0] = ids[k];
        ids[k] = t;
        sort_heap_down(p, ids, k, 0);
    }
}

/* A probability's float bits, which order positive floats like their values. */
static inline uint32_t prob_bits(float p) {
    uint32_t u;
    memcpy(&u, &p, sizeof u);
    return u;
}

/* The last member of the nucleus of prob[V] (mass >= target) in the
 * (prob desc, id asc) order: the nucleus is every token at least as good as
 * (*pthr, *ithr). Returns the nucleus mass.
 *
 * Two rounds of bucketing by the probabilities' bits instead of ordering
 * the vocabulary: by exponent (octaves) over all tokens, then by the next 8
 * mantissa bits over the tokens of the octave where the running mass from
 * the top reaches the target; only the tokens of the one sub-bucket where
 * it ends are sorted (a handful). */
static double nucleus_threshold(tlm_sampler *s, const float *prob, int V, double target, float *pthr,
                                int32_t *ithr) {
    double *hist = s->hist; /* [SAMPLER_BUCKETS] sub-buckets */
    float oct[4][256];      /* four interleaved copies: consecutive tokens rarely wait on one sum */
    memset(oct, 0, sizeof oct);
    for (int i = 0; i < V; i++) oct[i & 3][prob_bits(prob[i]) >> 23] += prob[i];
    int ko = 0;
    double above = 0;
    for (int k = 255; k >= 0; k--) {
        double m = (double)oct[0][k] + oct[1][k] + oct[2][k] + oct[3][k];
        if (m == 0) continue;
        ko = k;
        if (above + m >= target) break;
        above += m;
    }
    /* the octave's tokens, by their next 8 bits */
    int32_t *cand = s->idx;
    int nc = 0;
    memset(hist, 0, SAMPLER_BUCKETS * sizeof *hist);
    for (int i = 0; i < V; i++) {
        uint32_t u = prob_bits(prob[i]);
        if ((int)(u >> 23) != ko) continue;
        cand[nc++] = i;
        hist[(u >> 15) & 0xff] += prob[i];
    }
    int ks = 0;
    for (int k = SAMPLER_BUCKETS - 1; k >= 0; k--) {
        if (hist[k] == 0) continue;
        ks = k;
        if (above + hist[k] >= target) break;
        above += hist[k];
    }
    /* the sub-bucket's tokens, best first */
    int n = 0;
    for (int c = 0; c < nc; c++)
        if ((int)((prob_bits(prob[cand[c]]) >> 15) & 0xff) == ks) cand[n++] = cand[c];
    sort_by_prob(prob, cand, n);
    double cum = above;
    int c = 0;
    for (; c < n; c++) {
        cum += prob[cand[c]];
        if (cum >= target) break;
    }
    if (c == n) c = n - 1; /* rounding: the whole sub-bucket */
    *pthr = prob[cand[c]];
    *ithr = cand[c];
    return cum;
}

int sampler_greedy(const tlm_sampler_params *p) { return p->temperature == 0.0f || p->top_k == 1; }

int32_t sampler_sample(tlm_sampler *s, const float *logits, tlm_rng *rng) {
    if (sampler_greedy(&s->p)) return sampler_argmax(logits, s->V);
    return sampler_sample_u(s, logits, tlm_rng_uniform(rng));
}

int32_t sampler_sample_u(tlm_sampler *s, const float *logits, float u) {
    const int V = s->V;
    const tlm_sampler_params *p = &s->p;
    if (sampler_greedy(p)) return sampler_argmax(logits, V);
    const float invT = 1.0f / p->temperature;
    int32_t *idx = s->idx;
    float *prob = s->prob;

    if (p->top_k > 0 && p->top_k < V) {
        /* top-k: the k best, best first, then the nucleus as a prefix */
        const int n = p->top_k;
        select_top_k(logits, V, n, idx);
        const float mx = logits[idx[0]];
        /* exp((l - max) / T): the max subtraction keeps every term in (0, 1].
         * tlm_expf, as on the whole-vocabulary path: a device sampler that
         * reproduces it operation for operation gets the same bits, where
         * two libraries' expf may differ in the last one. */
        double sum = 0;
        for (int j = 0; j < n; j++) {
            prob[j] = tlm_expf((logits[idx[j]] - mx) * invT);
            sum += prob[j];
        }
        int hi = n;
        double mass = sum;
        if (p->top_p < 1.0f) {
            double target = (double)p->top_p * sum, cum = 0;
            int m = 0;
            while (m < n) {
                cum += prob[m++];
                if (cum >= target) break;
            }
            hi = m;
            mass = cum;
        }
        /* Inverse CDF with one uniform; rounding can leave r just past the
         * last bucket, which then takes it. */
        double r = (double)u * mass, cum = 0;
        for (int j = 0; j < hi; j++) {
            cum += prob[j];
            if (r < cum) return idx[j];
        }
        return idx[hi - 1];
    }

    /* the whole vocabulary: probabilities in id order */
    float mx = logits[0];
#pragma omp simd reduction(max : mx)
    for (int i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    float fsum = 0;
#pragma omp simd reduction(+ : fsum)
    for (int i = 0; i < V; i++) {
        prob[i] = tlm_expf((logits[i] - mx) * invT);
        fsum += prob[i];
    }
    double mass = fsum;
    float pthr = 0.0f;
    int32_t ithr = V;
    if (p->top_p < 1.0f) mass = nucleus_threshold(s, prob, V, (double)p->top_p * fsum, &pthr, &ithr);
    /* Inverse CDF over the nucleus in id order (one uniform): whole blocks
     * of 16 tokens first (their nucleus mass summed as vectors), then the
     * block where the uniform falls, token by token. */
    double r = (double)u * mass, cum = 0;
    int32_t last = -1;
    int i0 = 0;
    for (; i0 + 16 <= V; i0 += 16) {
        float bs = 0;
#pragma omp simd reduction(+ : bs)
        for (int i = i0; i < i0 + 16; i++) {
            int in = prob[i] > pthr || (prob[i] == pthr && i <= ithr);
            bs += in ? prob[i] : 0.0f;
        }
        if (r < cum + bs) break;
        cum += bs;
    }
    for (int i = i0; i < V; i++) {
        if (prob[i] < pthr || (prob[i] == pthr && i > ithr)) continue;
        cum += prob[i];
        last = i;
        if (r < cum) return i;
    }
    if (last >= 0) return last;
    /* rounding left r past every token: the last member of the nucleus */
    for (int i = V - 1; i >= 0; i--)
        if (prob[i] > pthr || (prob[i] == pthr && i <= ithr)) return i;
    return ithr < V ? ithr : V - 1;
}
