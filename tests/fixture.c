#include "fixture.h"

#include <stdio.h>
#include <stdlib.h>

#include "testutil.h"
#include "tinylm/tinylm.h"

static size_t numel(const tlm_tensor *t) { return (size_t)t->rows * (size_t)t->cols; }

int fixture_open(test_fixture *fx) {
    fx->f = safetensors_open(FIXTURE_PATH);
    if (!fx->f) return -1;
    /* dev/make_fixtures.py's model; the file holds no configuration */
    fx->cfg = (tlm_config){.vocab = 300, .dim = 64, .layers = 2, .heads = 4, .hidden = 176, .context = 32,
                           .norm_eps = 1e-5f, .rope_theta = 10000.0f};
    enum { N = FIXTURE_B * FIXTURE_T };
    float in[N], tg[N];
    if (safetensors_read_f32(fx->f, "inputs", in, N) != 0 || safetensors_read_f32(fx->f, "targets", tg, N) != 0) {
        fixture_close(fx);
        return -1;
    }
    fx->nvalid = 0;
    for (int i = 0; i < N; i++) {
        fx->inputs[i] = (int32_t)in[i];
        fx->targets[i] = (int32_t)tg[i];
        fx->nvalid += fx->targets[i] >= 0;
    }
    return 0;
}

void fixture_close(test_fixture *fx) {
    if (fx->f) safetensors_close(fx->f);
    fx->f = NULL;
}

float *fixture_read(const test_fixture *fx, const char *name, size_t n) {
    float *buf = malloc(n * sizeof(float));
    assert_non_null(buf);
    if (safetensors_read_f32(fx->f, name, buf, n) != 0) fail_msg("fixture: %s", tlm_last_error());
    return buf;
}

void fixture_model(const test_fixture *fx, tlm_model *m, tlm_ops *o) {
    if (model_create(m, &fx->cfg, o) != 0) fail_msg("model_create: %s", tlm_last_error());
    if (model_alloc_train(m, FIXTURE_B, FIXTURE_T) != 0) fail_msg("model_alloc_train: %s", tlm_last_error());
    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *t = &m->tensors[i];
        /* the shape too, not just the element count: a transposed matrix
         * has the same count */
        int64_t shape[4];
        int nd = safetensors_shape(fx->f, t->name, shape);
        if (nd != t->ndim)
            fail_msg("fixture %s: ndim %d, model wants %d (%s)", t->name, nd, t->ndim, tlm_last_error());
        assert_int_equal(shape[0], t->rows);
        if (nd == 2) assert_int_equal(shape[1], t->cols);
        float *buf = fixture_read(fx, t->name, numel(t));
        o->copy_h2d(o, m->params + t->offset, buf, numel(t) * sizeof(float));
        free(buf);
    }
}
