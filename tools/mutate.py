"""Mutation testing of one fastclip module with mutmut, against the tests that cover it.

    python tools/mutate.py fastclip/tokenizer.py            # mutate, run the mapped tests, print the score
    python tools/mutate.py fastclip/losses.py --timeout 900 # bound the whole run (seconds)
    python tools/mutate.py fastclip/nn.py --mutants 'fastclip.nn.x_causal*'  # only the mutants named (globs)
    python tools/mutate.py --list                            # the module -> tests map

Each module gets its own work directory, ``.mutation/<module>/`` (ignored by git): a generated ``pyproject.toml``
whose ``[tool.mutmut]`` section is the repository's with ``only_mutate`` set to the module and the test selection
set to the module's tests (``MODULE_TESTS`` below), plus links to ``fastclip/`` and ``tests/``. mutmut copies the
tree to ``mutants/`` there and caches its verdicts, so a second run only retries what changed. Inspect survivors
from that directory: ``cd .mutation/fastclip.tokenizer && mutmut results`` / ``mutmut show <name>``.

Score = killed / (mutants - equivalent), where the equivalent mutants are those recorded with a reason in
``tests/mutation/equivalent_<module>.toml``. Tests run with a fixed seed (FASTCLIP_TEST_SEED, default 0) so verdicts repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "tests" / "mutation"  # *.toml: one file per module, equivalent_<module>.toml


def _ids(test: str, *params: str) -> list:
    """Node ids of some parametrizations of ``test`` ("file::function")."""
    return [f"{test}[{p}]" for p in params]


# The torch backends' tests without the slow ones (n = 257 and 1000 in fp64 with 7-row chunks, the Triton kernels
# in the interpreter): every function of the module is still run, at small odd sizes, every chunk boundary, fp64,
# fp32, fp16/bf16, label smoothing, the confident and extreme regimes.
_SCALES_CLIP = ("1.0-None-True", "14.3--2.5-True", "100.0-None-True", "30.0-1.0-False")
_SCALES_SIGLIP = ("1.0--10.0-True", "10.0--10.0-True", "100.0-0.3-True", "30.0-None-False", "100.0-25.0-True")
_SMALL = ("1-5", "3-16", "77-48")
_CONTRASTIVE_TORCH = [
    *_ids("tests/test_contrastive.py::test_matches_open_clip_fp64", *(f"{s}-{n}-torch" for s in _SCALES_CLIP
                                                                      for n in _SMALL)),
    "tests/test_contrastive.py::test_matches_open_clip_fp32",
    *_ids("tests/test_contrastive.py::test_label_smoothing", "0.1-torch", "1.0-torch"),
    *_ids("tests/test_contrastive.py::test_torch_chunk_sizes", "2", "13", "1000"),
    "tests/test_contrastive.py::test_nan_in_nan_out[torch]",
    "tests/test_contrastive.py::test_bf16_on_cpu_through_auto",
    "tests/test_contrastive.py::test_module_passes_its_arguments",
    "tests/test_contrastive.py::test_torch_backend_chunks",
    "tests/test_contrastive.py::test_rowdot_in_chunks",
    "tests/test_contrastive.py::test_backward_without_targets[torch]",
    "tests/test_distributed_edges.py::test_contrastive_ring_bf16_is_the_fp32_ring_rounded_once",
    *_ids("tests/test_contrastive.py::test_ops_outputs_have_their_fakes_dtypes", "torch-dtype0-scalar_dtype0",
          "torch-dtype1-scalar_dtype1"),
    "tests/test_contrastive.py::test_merge_partials_on_the_partials_device",
    "tests/test_contrastive.py::test_torch_backend_on_the_features_device_and_dtype",
    *_ids("tests/test_loss_numerics.py::test_contrastive_uniform", "0.0-torch-dtype0", "0.0-torch-dtype1",
          "0.1-torch-dtype2"),
    *_ids("tests/test_regimes_losses.py::test_contrastive_trained_regime", "plain-float32-torch",
          "plain-float16-torch", "bias+smoothing-float32-torch", "bias+smoothing-float16-torch"),
]
_SIGLIP_TORCH = [
    *_ids("tests/test_siglip.py::test_matches_open_clip_fp64", *(f"{s}-{n}-torch" for s in _SCALES_SIGLIP
                                                                 for n in _SMALL)),
    "tests/test_siglip.py::test_torch_fp32",
    *_ids("tests/test_siglip.py::test_negative_only_blocks", "1-1-torch", "3-5-torch", "40-33-torch", "17-17-torch"),
    *_ids("tests/test_siglip.py::test_torch_chunk_sizes", "2", "13", "1000"),
    "tests/test_siglip.py::test_extreme_logits_are_exact",
    "tests/test_siglip.py::test_upstream_gradient_and_retain_graph[torch]",
    *_ids("tests/test_siglip.py::test_backward_makes_a_deferred_text_gradient", "False-torch", "True-torch"),
    "tests/test_siglip.py::test_no_grad_forward[torch]",
    "tests/test_siglip.py::test_nan_in_nan_out[torch]",
    "tests/test_siglip.py::test_auto_selection_and_bf16_on_cpu",
    "tests/test_siglip.py::test_module_passes_its_arguments",
    "tests/test_siglip.py::test_torch_backend_chunks",
    "tests/test_siglip.py::test_torch_backend_on_the_features_device",
    *_ids("tests/test_regimes_losses.py::test_siglip_extreme_logits", "float32-torch", "float16-torch"),
]

# The tests that go through topk_similarity (checks, autocast, chunked gallery, custom op, autograd) on the torch
# and reference backends, and the cheapest Triton ones (the "triton" row's impl and dtypes); not the torch
# backend's tile tests (they call pytorch.py directly), nor the slow Triton cases
_TOPK = [
    "tests/test_forward_ad.py",
    *_ids("tests/test_topk.py::test_random_matches_full_topk",
          *(f"torch-dtype{6 * i + j}-{s}" for i in range(4) for j, s in ((0, "1-1-3-1"), (1, "3-77-33-5")))),
    *_ids("tests/test_topk.py::test_ties_lower_index_first", "torch-dtype0-1", "torch-dtype8-10"),
    *[f"tests/test_topk.py::test_{t}[{b}]" for t in ("all_equal_scores_give_first_indices", "signed_zero_is_a_tie",
                                                   "nan_and_inf_rank_as_torch") for b in ("torch", "reference")],
    "tests/test_topk.py::test_nan_and_inf_rank_as_torch[triton]",
    *_ids("tests/test_topk.py::test_gallery_chunks_merge_exactly", "torch-1", "torch-64", "torch-333", "reference-64"),
    "tests/test_topk.py::test_memmap_gallery_fp16",
    "tests/test_topk.py::test_gradient_matches_reference",
    "tests/test_topk.py::test_opcheck",
    "tests/test_topk.py::test_bad_input",
    "tests/test_topk.py::test_explicit_backend_refusal_says_why",
    "tests/test_topk.py::test_triton_k_limit",
    "tests/test_topk.py::test_autocast_scores_in_the_autocast_dtype",
    *[f"tests/test_topk.py::test_{t}" for t in (
        "bad_gallery_chunk", "bad_input_messages_name_the_layout_and_the_devices", "host_gallery_chunk_rows",
        "chunks_reach_the_backend_on_the_queries_device_and_dtype", "gallery_goes_whole_unless_chunked",
        "values_dtype_does_not_follow_the_default_dtype", "reference_backend_is_plain_autograd")],
]

# The tests that go through siglip_loss / siglip_block / the custom ops on the torch and reference backends
# (checks, autocast, the deferred text gradient, upstream gradients, no-grad forwards), and the cheapest
# Triton ones (the row whose forward defers the text gradient); not the Triton numerics, nor opcheck and
# torch.compile (seconds each; the ops' bodies and fakes are decorated, which mutmut leaves alone)
_SIGLIP = [
    "tests/test_forward_ad.py",
    *_ids("tests/test_siglip.py::test_matches_open_clip_fp64",
          *(f"{s}-{n}-{b}" for s in ("1.0--10.0-True", "30.0-None-False") for n in ("1-5", "3-16")
            for b in ("reference", "torch"))),
    *_ids("tests/test_siglip.py::test_torch_fp32", "1.0--10.0-3-16"),
    *_ids("tests/test_siglip.py::test_negative_only_blocks", "1-1-torch", "40-33-torch", "3-5-triton",
          "3-5-reference"),
    *_ids("tests/test_siglip.py::test_torch_chunk_sizes", "13"),
    *[f"tests/test_siglip.py::test_{t}[{b}]" for t in ("upstream_gradient_and_retain_graph", "no_grad_forward")
      for b in ("torch", "triton")],
    *_ids("tests/test_siglip.py::test_backward_makes_a_deferred_text_gradient", "False-torch", "True-torch",
          "True-triton"),
    "tests/test_siglip.py::test_module_passes_its_arguments",
    "tests/test_siglip.py::test_python_number_scale_and_bias",
    "tests/test_siglip.py::test_bad_inputs_raise_clear_errors",
    *_ids("tests/test_siglip.py::test_nan_in_nan_out", "reference", "torch"),
    "tests/test_siglip.py::test_explicit_backend_that_cannot_run_raises",
    "tests/test_siglip.py::test_auto_selection_and_bf16_on_cpu",
    "tests/test_autocast.py::test_siglip_under_autocast",
    "tests/test_autocast.py::test_siglip_module_under_cpu_autocast_does_not_crash",
    *[f"tests/test_siglip.py::test_{t}" for t in ("op_called_without_gradient_refuses_a_backward",
                                                  "op_outputs_its_gradients_as_non_differentiable",
                                                  "forward_makes_gradients_only_when_one_is_wanted")],
]

# The tests that go through contrastive_loss and its custom ops on the torch and reference backends (checks,
# autocast, label smoothing, chunks, the fakes' dtypes, the trained regime); the Triton numerics and torch.compile
# are left out (seconds each; the ops' bodies and fakes are decorated, which mutmut leaves alone)
_CONTRASTIVE = [
    "tests/test_forward_ad.py",
    *_ids("tests/test_contrastive.py::test_matches_open_clip_fp64",
          *(f"{s}-{n}-{b}" for s in ("1.0-None-True", "14.3--2.5-True") for n in ("1-5", "3-16")
            for b in ("reference", "torch"))),
    *_ids("tests/test_contrastive.py::test_matches_open_clip_fp32", "1.0-None-3-16-torch",
          "100.0--10.0-3-16-reference"),
    "tests/test_contrastive.py::test_module_passes_its_arguments",
    "tests/test_contrastive.py::test_python_number_scale",
    *_ids("tests/test_contrastive.py::test_label_smoothing", "0.1-torch", "1.0-torch"),
    *_ids("tests/test_contrastive.py::test_torch_chunk_sizes", "13"),
    "tests/test_contrastive.py::test_torch_backend_chunks",
    "tests/test_contrastive.py::test_ops_outputs_have_their_fakes_dtypes",
    "tests/test_contrastive.py::test_bad_inputs_raise_clear_errors",
    *_ids("tests/test_contrastive.py::test_nan_in_nan_out", "reference", "torch"),
    "tests/test_contrastive.py::test_explicit_backend_that_cannot_run_raises",
    "tests/test_contrastive.py::test_bf16_on_cpu_through_auto",
    "tests/test_autocast.py::test_contrastive_under_autocast",
    "tests/test_checks.py::test_feature_errors_name_the_argument_shape_dtype_and_device[contrastive_loss]",
    "tests/test_checks.py::test_scalar_arguments",
    "tests/test_checks.py::test_label_smoothing_bounds",
    *_ids("tests/test_regimes_losses.py::test_contrastive_trained_regime", "plain-float32-torch",
          "bias+smoothing-float16-torch"),
]

# The tests that go through flash_attention: the checks' messages, the torch and reference backends at a small
# shape with every mask, autocast, and the custom ops' glue (saved inputs, causal, mask, scale) through the
# smallest Triton cross-attention cases; not the Triton numerics at CLIP shapes, nor opcheck and torch.compile
_MASKS = ("none", "causal", "padding", "causal+padding", "all-padded")
_ATTENTION = [
    "tests/test_forward_ad.py",
    *_ids("tests/test_attention.py::test_plain_backends_fp64",
          *(f"2-3-2-16-{m}-{b}" for m in _MASKS for b in ("torch", "reference"))),
    *_ids("tests/test_attention.py::test_torch_backend_low_precision", "dtype0"),
    "tests/test_attention.py::test_fully_padded_rows_zero_output_and_finite_grads",
    *_ids("tests/test_attention.py::test_nan_in_nan_out", "q-reference", "q-torch", "k-triton"),
    "tests/test_attention.py::test_bad_inputs_raise_clear_errors",
    "tests/test_attention.py::test_bad_input_messages_in_full",
    "tests/test_attention.py::test_explicit_backend_that_cannot_run_raises",
    "tests/test_attention.py::test_auto_selection",
    *_ids("tests/test_attention_cross.py::test_cross_attention",
          *(f"{c}-dtype0-{b}" for c in ("1-1-33-2-16-False-True", "2-33-1-1-16-True-False")
            for b in ("reference", "torch", "triton"))),
    *_ids("tests/test_attention_cross.py::test_causal_is_top_left", "5-12-reference", "5-12-torch", "5-12-triton"),
    "tests/test_autocast.py::test_attention_under_autocast",
    "tests/test_checks.py::test_attention_errors",
]

# module -> the test files (pytest node ids allowed) that exercise it
MODULE_TESTS = {
    "fastclip/tokenizer.py": ["tests/test_tokenizer.py", "tests/test_regimes_tokenizer.py"],
    "fastclip/transforms.py": ["tests/test_transforms.py"],
    # the tests that build the nn.Modules (the rest of those files call the functional ops and the kernels)
    "fastclip/losses.py": ["tests/test_contrastive.py::test_matches_open_clip_fp64",
                           "tests/test_contrastive.py::test_matches_open_clip_fp32",
                           "tests/test_contrastive.py::test_output_dict_and_module_args",
                           "tests/test_contrastive.py::test_module_holds_what_clip_loss_holds",
                           "tests/test_contrastive.py::test_module_passes_its_arguments",
                           "tests/test_contrastive.py::test_module_refuses_bad_arguments",
                           "tests/test_contrastive.py::test_module_repr",
                           "tests/test_siglip.py::test_matches_open_clip_fp64",
                           "tests/test_siglip.py::test_output_dict_and_module_args",
                           "tests/test_siglip.py::test_module_holds_what_siglip_loss_holds",
                           "tests/test_siglip.py::test_module_passes_its_arguments",
                           # the ranks as threads of the test process: the distributed forwards' arguments
                           "tests/test_distributed.py::test_distributed[world2-clip_local0_gwg0_bias]",
                           "tests/test_distributed.py::test_distributed[world2-siglip_bidir]"],
    "fastclip/distributed.py": ["tests/test_distributed.py", "tests/test_distributed_edges.py",
                                "tests/test_regimes_distributed.py"],
    # the dispatcher's own tests, not the numerical files that merely call it (minutes per mutant)
    "fastclip/dispatch.py": ["tests/test_regimes_dispatch.py",
                             *[f"tests/test_{op}.py::test_{t}" for op, t in (
                                 ("cuda_build", "choice_table_is_valid_json_with_known_fields"),
                                 ("cuda_build", "preferred_picks_the_smallest_matching_bucket"),
                                 ("cuda_build", "explicit_cuda_backend_explains_itself_on_the_cpu"),
                                 ("autocast", "bad_backend_env_names_the_variable"),
                                 ("contrastive", "explicit_backend_that_cannot_run_raises"),
                                 ("contrastive", "auto_selection_and_env_override"),
                                 ("contrastive", "bf16_on_cpu_through_auto"),
                                 ("contrastive", "info_lists_every_backend"),
                                 ("siglip", "explicit_backend_that_cannot_run_raises"),
                                 ("siglip", "auto_selection_and_bf16_on_cpu"),
                                 ("attention", "explicit_backend_that_cannot_run_raises"),
                                 ("attention", "auto_selection"))]],
    "fastclip/_checks.py": ["tests/test_checks.py", "tests/test_topk.py::test_bad_input", "tests/test_forward_ad.py",
                            *[f"tests/test_{op}.py::test_bad_inputs_raise_clear_errors"
                              for op in ("contrastive", "siglip", "attention")],
                            "tests/test_autocast.py::test_fp64_is_never_cast_by_autocast",
                            "tests/test_autocast.py::test_numpy_scalar_logit_scale"],
    # not test_attention.py's torch.compile(fullgraph=True) block: compiling cannot trace mutmut's trampolines
    "fastclip/nn.py": ["tests/test_nn.py", "tests/test_regimes_attention.py"],
    "fastclip/ops/contrastive/__init__.py": _CONTRASTIVE,
    "fastclip/ops/contrastive/pytorch.py": _CONTRASTIVE_TORCH,
    "fastclip/ops/contrastive/reference.py": ["tests/test_contrastive.py", "tests/test_regimes_losses.py"],
    "fastclip/ops/siglip/__init__.py": _SIGLIP,
    "fastclip/ops/siglip/pytorch.py": _SIGLIP_TORCH,
    "fastclip/ops/siglip/reference.py": ["tests/test_siglip.py", "tests/test_regimes_losses.py"],
    "fastclip/ops/attention/__init__.py": _ATTENTION,
    # the tests that run the "torch" backend (test_attention.py's others exercise Triton in the interpreter)
    "fastclip/ops/attention/pytorch.py": [
        "tests/test_attention.py::test_plain_backends_fp64",
        "tests/test_attention.py::test_torch_backend_low_precision",
        "tests/test_attention.py::test_fully_padded_rows_zero_output_and_finite_grads",
        "tests/test_attention.py::test_nan_in_nan_out", "tests/test_attention_cross.py::test_causal_is_top_left",
        "tests/test_regimes_attention.py::test_cross_attention",
        "tests/test_regimes_attention.py::test_torch_backend_calls_sdpa",
        "tests/test_regimes_attention.py::test_torch_backend_nan_query_that_sees_no_key",
        "tests/test_regimes_attention.py::test_sdpa_mask"],
    "fastclip/ops/attention/reference.py": ["tests/test_attention.py", "tests/test_regimes_attention.py"],
    # the towers' modules against open_clip's, torch's and timm's on tiny configs, in milliseconds each (whole
    # models in test_models.py take seconds: open_clip's 49,408-token vocabulary); no torch.compile(fullgraph=True)
    # test (it cannot trace mutmut's trampolines)
    "fastclip/models/transformer.py": [
        "tests/test_towers.py",
        "tests/test_regimes_models.py::test_layer_norm_upcasts_bit_for_bit",
        "tests/test_regimes_models.py::test_layer_norm_low_precision_weights_stay_in_their_dtype"],
    "fastclip/ops/topk/__init__.py": _TOPK,
    "fastclip/models/factory.py": ["tests/test_models.py", "tests/test_regimes_models.py"],
}

# mutmut's exit-code verdicts (mutmut.__main__.status_by_exit_code). A test process killed by SIGABRT (-6; mutmut
# says "suspicious") counts as killed: the unmutated tests never abort (mutmut runs them clean first), and gloo
# aborts the process when ranks join one collective with different sizes, which is how a mutant of the shape
# exchange fails
KILLED = {1, 3, -24, 24, 152, 36, 37, -6}  # failed test, timeout (SIGXCPU), type check, SIGABRT
TIMEOUT = {-24, 24, 152}
SURVIVED = {0, 5}
NO_TESTS = {33}


def load_equivalent() -> dict:
    """Every equivalent mutant recorded under tests/mutation/ (one TOML file per module), by mutmut's name."""
    equivalent = {}
    for path in sorted(EQUIVALENT.glob("*.toml")):
        equivalent.update(tomllib.loads(path.read_text()))
    return equivalent


def work_dir(module: str) -> Path:
    return WORK / module.removesuffix(".py").replace("/", ".")


def prepare(module: str) -> Path:
    """The module's work directory: links to the sources and tests, a pyproject.toml aimed at this module."""
    tests = [t for t in MODULE_TESTS[module] if (ROOT / t.split("::")[0]).exists()]
    wd = work_dir(module)
    wd.mkdir(parents=True, exist_ok=True)
    for name in ("fastclip", "tests"):
        link = wd / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    text = (ROOT / "pyproject.toml").read_text()
    base = tomllib.loads(text)["tool"]["mutmut"]
    section = dict(base, only_mutate=[module], pytest_add_cli_args_test_selection=tests)
    lines = [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    pytest_cfg = tomllib.loads(text)["tool"]["pytest"]["ini_options"]
    lines_pytest = [f"{k} = {json.dumps(v)}" for k, v in pytest_cfg.items()]
    (wd / "pyproject.toml").write_text("[tool.mutmut]\n" + "\n".join(lines) + "\n\n[tool.pytest.ini_options]\n"
                                       + "\n".join(lines_pytest) + "\n")
    return wd


def results(wd: Path, module: str) -> dict:
    """Per-mutant exit codes from mutmut's metadata for ``module``."""
    meta = wd / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def score(module: str, codes: dict, equivalent: dict) -> tuple[str, list]:
    total = len(codes)
    codes = {k: c for k, c in codes.items() if c is not None}  # mutants not tried yet (a stopped run)
    equiv = {k for k in codes if k in equivalent}
    timeouts = sum(c in TIMEOUT for k, c in codes.items() if k not in equiv)
    killed = [k for k, c in codes.items() if c in KILLED and k not in equiv]
    survived = sorted(k for k, c in codes.items() if c not in KILLED and k not in equiv)
    denom = len(codes) - len(equiv)
    tried = f"{len(codes)} of {total} mutants tried"
    if not denom:  # nothing scored: no score, not 100%
        return f"{module}: {tried}, no score (run it, or mutmut found no test for its mutants)", survived
    pct = 100.0 * len(killed) / denom
    partial = "" if len(codes) == total else f" PARTIAL: {total - len(codes)} mutants not tried,"
    line = (f"{module}: {tried},{partial} {len(killed)} killed, {len(equiv)} equivalent, {len(survived)} not killed"
            f" -> {pct:.1f}% of non-equivalent tried (timeouts counted as killed: {timeouts})")
    return line, survived


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", nargs="?", help="e.g. fastclip/tokenizer.py")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds for the whole mutmut run (default 1200)")
    ap.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    ap.add_argument("--mutants", nargs="+", metavar="NAME", default=[],
                    help="run only these mutants (mutmut's names, globs allowed), cached verdicts or not")
    ap.add_argument("--report", action="store_true", help="only print the score of the last run")
    ap.add_argument("--list", action="store_true", help="print the module -> tests map")
    args = ap.parse_args()
    if args.list:
        for m, t in MODULE_TESTS.items():
            print(f"{m}: {' '.join(t)}")
        return 0
    if args.module not in MODULE_TESTS:
        ap.error(f"module must be one of: {', '.join(MODULE_TESTS)}")
    if shutil.which("mutmut") is None:
        ap.error("mutmut is not installed: pip install -e '.[test]'")
    wd = prepare(args.module)
    if not args.report:
        # one torch thread per worker: the workers are forked from a process that has imported torch, and a
        # shared 2-core machine gains nothing from oversubscription. Threaded ranks give up after 20 s, not 120:
        # a mutant that misaddresses a send leaves them waiting for a peer (tests/threaded_ranks.py)
        env = dict(os.environ, FASTCLIP_TEST_SEED=os.environ.get("FASTCLIP_TEST_SEED", "0"), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", FASTCLIP_TEST_RANK_TIMEOUT="20")
        # first the mutants without a verdict, then the cached survivors again (mutmut keeps a verdict unless
        # the mutant is named), so a test added since the last run gets its chance to kill them
        deadline = time.monotonic() + args.timeout
        survivors = score(args.module, results(wd, args.module), load_equivalent())[1]
        for names in ([args.mutants] if args.mutants else [[], survivors]):
            if names is survivors and not names:
                break
            # its own session, so that a timeout stops mutmut's fork server and workers too
            proc = subprocess.Popen(["mutmut", "run", "--max-children", str(args.max_children), *names], cwd=wd,
                                    env=env, start_new_session=True)
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                print(f"mutmut stopped after {args.timeout} s; the score counts the mutants tried so far",
                      file=sys.stderr)
                break
    line, survived = score(args.module, results(wd, args.module), load_equivalent())
    print(line)
    for name in survived:
        print("  not killed:", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
