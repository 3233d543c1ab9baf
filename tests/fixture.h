/*
 * The tiny model of tests/fixtures/tiny_ref.safetensors, made by
 * dev/make_fixtures.py with the independent PyTorch reference
 * (dev/reference.py): its configuration, parameters (under their model
 * names), one batch of inputs and targets, and the reference results
 * (logits, loss, grad.*, adamw.*). Shared by the tests that check a
 * backend's model against it (test_model, test_cuda), so the file is read
 * and the model filled in one way only.
 */
#ifndef TLM_TESTS_FIXTURE_H
#define TLM_TESTS_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "ops/ops.h"

#define FIXTURE_PATH TLM_SOURCE_DIR "/tests/fixtures/tiny_ref.safetensors"
/* The fixture's batch: FIXTURE_B sequences of FIXTURE_T tokens (= context). */
#define FIXTURE_B 2
#define FIXTURE_T 32

typedef struct {
    tlm_st_file *f; /* open while the fixture is */
    tlm_config cfg;
    int32_t inputs[FIXTURE_B * FIXTURE_T], targets[FIXTURE_B * FIXTURE_T];
    int nvalid; /* targets that are not ignored (>= 0) */
} test_fixture;

/* Open the fixture and read its batch. 0, or -1 with tlm_last_error()
 * saying why (and nothing left open). Makes no cmocka assertion, so a
 * group set-up may call it and report the failure its own way. */
int fixture_open(test_fixture *fx);
void fixture_close(test_fixture *fx);

/* Tensor `name` as n floats, malloc'd; fails the test when it is missing or
 * has another element count. */
float *fixture_read(const test_fixture *fx, const char *name, size_t n);

/* model_create on o with the fixture's configuration, training buffers
 * for its batch, and every parameter from the fixture tensor of its name
 * (failing the test when one is missing or has another shape). */
void fixture_model(const test_fixture *fx, tlm_model *m, tlm_ops *o);

#endif
