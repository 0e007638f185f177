"""kvlib's C one-row kernel (kvlib.models.matvec): the function of F.linear, the model's tokens through it, and
what happens where it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlib.models import fastpath, matvec
from kvlib.models.decode import generate
from kvlib.models.loading import load


@pytest.fixture(autouse=True)
def kernel(request):
    """The tests of the kernel itself need it built here; those of a machine without it do not."""
    if "fresh" not in request.fixturenames and "KVLIB_C_KERNEL" not in request.node.name and not matvec.available():
        pytest.skip("no C compiler with OpenMP here")


SHAPES = [(1, 1), (7, 13), (192, 576), (33, 1536), (1000, 65), (3, 16)]


def _data(out: int, inp: int, dtype: torch.dtype, rows: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """w (out, inp), x (rows, inp), b (out,)"""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(dtype) for s in ((out, inp), (rows, inp), (out,)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, matvec.MAX_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_equals_f_linear_within_rounding(shape, rows, with_bias):
    w, x, b = _data(*shape, torch.float32, rows)
    b = b if with_bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = matvec.linear(x, w, b)
    assert y is not None and y.dtype == torch.float32 and y.shape == (rows, shape[0])
    scale = (x.double().abs() @ w.double().abs().T) + (0 if b is None else b.double().abs())
    assert ((y.double() - ref).abs() <= 1e-6 * scale + 1e-30).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_bfloat16_is_the_float32_sum_rounded_once(shape, rows):
    """Accumulated in float32 and rounded once: within half a bfloat16 step (8 significant bits: 2^-8 relative)
    of the exact sum of the bfloat16 inputs, plus the float32 accumulation's own error. Truncating instead of
    rounding would be off by up to a whole step."""
    w, x, b = _data(*shape, torch.bfloat16, rows, seed=1)
    exact = F.linear(x.double(), w.double(), b.double())
    y = matvec.linear(x, w, b)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (rows, shape[0])
    scale = x.double().abs() @ w.double().abs().T + b.double().abs()
    assert ((y.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-6 * scale + 1e-30).all()


def test_the_result_does_not_depend_on_the_thread_count():
    """Each output is one thread's dot product, in the same order whatever the threads: bit-identical."""
    w, x, b = _data(1000, 576, torch.float32, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matvec.linear(x, w, b)
        torch.set_num_threads(2)
        two = matvec.linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert one is not None and two is not None and torch.equal(one, two)


def test_each_row_is_its_own_product():
    """A row's result does not depend on the other rows of the call (the batch): bit-identical alone."""
    w, x, b = _data(300, 576, torch.float32, 6)
    together = matvec.linear(x, w, b)
    alone = torch.cat([matvec.linear(x[k : k + 1], w, b) for k in range(6)])
    assert together is not None and torch.equal(together, alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inf_and_nan_propagate(dtype):
    w, x, b = _data(4, 32, dtype)
    w[1, 3], w[2, 5] = float("inf"), float("nan")
    x[0, 3] = 1.0
    y = matvec.linear(x, w, b)
    assert y is not None and y[0, 1].isinf() and y[0, 2].isnan() and y[0, [0, 3]].isfinite().all()


def test_ties_round_to_even_as_torch_does():
    """1 + 2^-8 lies halfway between two bfloat16 values: it rounds to the even one (1.0); 1 + 2^-7 + 2^-8 rounds
    up (to 1 + 2^-6). Truncation would give 1 + 2^-7 for the second."""
    w = torch.tensor([[1.0, 2**-8], [1 + 2**-7, 2**-8]], dtype=torch.bfloat16)
    y = matvec.linear(torch.ones(1, 2, dtype=torch.bfloat16), w)
    expected = (w.float() @ torch.ones(2)).bfloat16()
    assert y is not None and torch.equal(y[0], expected) and y[0].tolist() == [1.0, 1 + 2**-6]


def test_what_it_cannot_serve_it_leaves_to_the_caller():
    w, x, b = _data(8, 16, torch.float32)
    assert matvec.linear(x, w, b[:4]) is None and matvec.linear(x, w, b[None]) is None  # a bias of another shape
    assert matvec.linear(x.half(), w.half()) is None  # float16: not a dtype of the kernel
    assert matvec.linear(x.bfloat16(), w) is None  # mixed dtypes
    assert matvec.linear(x, w.t().contiguous().t()) is None  # not row-major
    assert matvec.linear(x[:, :8], w) is None  # wrong length
    assert matvec.linear(x[0], w) is None  # not (rows, in)
    assert matvec.linear(x.expand(matvec.MAX_ROWS + 1, -1), w) is None  # more rows than a decode step's batch
    assert matvec.linear(x[:0], w) is None  # no row


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama", "tiny-gemma"])
@pytest.mark.parametrize("batch", [1, 3])
def test_c_kernel_tokens_equal_naive_fp32(monkeypatch, arch, batch):
    """Every architecture's decode through the C kernel (GPT-2's biases included), at batch 1 and 3, gives the
    naive path's tokens, logits within 1e-4; no packed copy is held."""
    monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "cmatvec")
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "cmatvec")
    lm = load(arch, weights="random", with_hf=False)
    ids = torch.randint(0, lm.cfg.vocab_size, (batch, 12), generator=torch.Generator().manual_seed(2))
    fast = generate(lm.model, ids, 8, keep_logits=True)
    assert fastpath.model_kernel(lm.model, batch) == "kvlib C" and fastpath.packed_bytes(lm.model) == 0
    assert fastpath.model_kernel(lm.model, 12) == "F.linear"  # the prompt's rows
    naive = generate(lm.model, ids, 8, cache="none", keep_logits=True)
    assert torch.equal(fast.tokens, naive.tokens)
    assert (fast.step_logits - naive.step_logits).abs().max() < 1e-4


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel's process state as in a new process, its cache in an empty folder."""
    monkeypatch.setattr(matvec, "_lib", None)
    monkeypatch.setattr(matvec, "_why_not", None)
    monkeypatch.setattr(matvec, "_noted", False)
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    return tmp_path


def test_built_once_into_the_cache_and_reused(fresh):
    assert matvec.available()
    built = list((fresh / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("matvec-")  # no temporary file left
    stamp = built[0].stat().st_mtime_ns
    matvec._lib = None  # a second process: loads the file, does not build it again
    assert matvec.available() and built[0].stat().st_mtime_ns == stamp


def test_another_source_or_flag_builds_another_file(fresh, monkeypatch):
    cc = matvec.compiler()
    first = matvec.library_path(cc)
    monkeypatch.setattr(matvec, "FLAGS", (*matvec.FLAGS, "-DKVLIB_TEST"))
    assert matvec.library_path(cc) != first


@pytest.mark.parametrize(
    ("cc", "why"), [("/nonexistent/cc", "could not build or load it"), ("false", "false exited with 1")]
)
def test_without_a_working_compiler_one_note_and_the_library_kernels(fresh, monkeypatch, capsys, cc, why):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(fastpath, "_ONE_ROW_CHOICE", {})
    assert not matvec.available() and not matvec.available(torch.bfloat16)
    w, x, _ = _data(4, 8, torch.float32)
    assert matvec.linear(x, w) is None
    lm = load("tiny-llama", weights="random", with_hf=False)
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    out = generate(lm.model, ids, 3)
    assert out.tokens.shape == (1, 3) and fastpath.model_kernel(lm.model, 1) != "kvlib C"
    err = capsys.readouterr().err
    assert err.count("note: kvlib's C matrix-vector kernel is not used") == 1 and why in err


def test_an_unwritable_cache_gives_one_note_and_the_library_kernels(fresh, monkeypatch, capsys):
    """KVLIB_CACHE under a regular file (unwritable even as root): a note in one line, no exception."""
    (fresh / "a-file").write_text("")
    monkeypatch.setenv("KVLIB_CACHE", str(fresh / "a-file" / "cache"))
    assert not matvec.available()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not build or load it" in err


def test_a_forced_c_kernel_runs_even_where_compiling_is_on(monkeypatch):
    """Regression: with compile_one_row on (KVLIB_COMPILE=1, bench --compile), ONE_ROW_KERNEL="cmatvec" still
    ran the torch.compile'd kernel: `_one_row_compiled` did not know the forced C kernel. The kernel named is the
    kernel called."""
    monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "cmatvec")
    calls = []
    real = matvec.run  # what Linear.forward calls after kernel_for's checks

    def spy(x, w, b):
        calls.append(x.shape)
        return real(x, w, b)

    monkeypatch.setattr(matvec, "run", spy)
    monkeypatch.setattr(fastpath, "one_row_matvec", lambda *a: pytest.fail("the compiled kernel ran"))
    lm = load("tiny-llama", weights="random", with_hf=False)
    fastpath.prepare_for_inference(lm.model, 1, compile_one_row=True)
    assert fastpath.model_kernel(lm.model, 1) == "kvlib C"
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    generate(lm.model, ids, 3)
    linears = sum(isinstance(m, fastpath.Linear) for m in lm.model.modules())
    # two decode steps, every matrix through the C kernel, and the prompt's last row through the LM head
    assert len(calls) == 2 * linears + 1 and all(shape[0] == 1 for shape in calls)


def test_the_plain_reference_stays_f_linear(monkeypatch):
    """PACK_CPU_WEIGHTS off is the tests' F.linear reference: the C kernel steps aside there too."""
    monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "cmatvec")
    monkeypatch.setattr(fastpath, "PACK_CPU_WEIGHTS", False)
    lm = load("tiny-llama", weights="random", with_hf=False)
    assert fastpath.model_kernel(lm.model, 1) == "F.linear"


def test_kvlib_c_kernel_0_takes_it_out_of_the_choice(monkeypatch):
    monkeypatch.setenv("KVLIB_C_KERNEL", "0")
    monkeypatch.setattr(fastpath, "_ONE_ROW_CHOICE", {})
    assert not matvec.available()
    lm = load("tiny-llama", weights="random", with_hf=False)
    assert fastpath.one_row_kernel(lm.model, torch.float32) in ("plain", "packed")
