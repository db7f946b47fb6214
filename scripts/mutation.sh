#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules whose unit tests are fast. Not part of CI: run it by hand after changing
# one of these modules or its tests, then triage what survives (a test that kills it, or a written reason why the
# mutant is equivalent: docs/mutation.md).
#
#   scripts/mutation.sh                       # every module below
#   scripts/mutation.sh pipeline/atomic.py    # one or more of them
#   MUT_NAMES='training.gan.x_d_*' scripts/mutation.sh training/gan.py   # some of a module's mutants
#
# Each module runs in its own scratch copy of the code ($MUT_WORK/<module>, default under /tmp), so the checkout
# is never touched; `mutmut results` / `mutmut show <name>` work inside that folder afterwards. mutmut lives in its
# own venv ($MUT_VENV, default .venv-mut): the project venv's packages are visible to it through a .pth file, and
# only mutmut (and its own dependencies) are installed there. With one worker on 2 busy cores: atomic.py ~1 min,
# fid.py ~5 min, training/common.py ~1 min, device.py 0.5 min, tokens.py ~8 min, config.py ~2 min,
# attention.py ~11 min, codegraph.py, layering.py, dvc_deps.py, checkpoint.py and vq_loss.py under 1 min each,
# maskgit.py ~1.5 min, gpt.py ~3.5 min, locks.py, runlog.py, compare.py, prepared.py and vqgan_io.py about a minute
# each, presets.py ~3 min, errors.py, report.py, fid_reference.py and stage_cli.py about a minute, env.py ~2.5 min
# with two workers (docs/mutation.md has the scores and the triage).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MUTMUT_VERSION=3.8.1
VENV=${MUT_VENV:-$ROOT/.venv-mut}
WORK=${MUT_WORK:-/tmp/tokenmill-mutation}
JOBS=${MUT_JOBS:-2}

# module -> the fast tests that exercise it
declare -A TESTS=(
  [pipeline/atomic.py]="tests/test_behaviour_atomic.py"
  [pipeline/fid.py]="tests/test_fid.py tests/test_behaviour_metrics.py tests/test_behaviour_fid_contract.py"
  [models/quantizer.py]="tests/test_vqgan_models.py tests/test_behaviour_quantizer.py"
  [training/common.py]="tests/test_behaviour_determinism.py tests/test_behaviour_training.py"
  [pipeline/device.py]="tests/test_behaviour_training.py tests/test_behaviour_device.py"
  # tokens: the store's own tests; test_tokenize.py's other tests run the tokenize stage in a fixture (1-30 s each,
  # paid again by every mutant) and are left to the main suite
  [pipeline/tokens.py]="tests/test_behaviour_tokens.py tests/test_tokenize.py::test_record_layout_and_dtypes
    tests/test_tokenize.py::test_lmdb_map_grows_from_a_tiny_map"
  [models/attention.py]="tests/test_attention.py tests/test_behaviour_attention_modules.py
    tests/test_behaviour_attention_xformers.py"
  [pipeline/config.py]="tests/test_config.py tests/test_behaviour_config.py"
  # cache identity: the import graph and dvc.yaml's code deps (test_cache_identity's other tests run dvc itself)
  [pipeline/codegraph.py]="tests/test_structure.py tests/test_behaviour_codegraph.py
    tests/test_cache_identity.py::test_dvc_yaml_code_deps_equal_every_stage_import_closure
    tests/test_cache_identity.py::test_import_graph_sees_function_level_relative_and_submodule_imports"
  [pipeline/layering.py]="tests/test_structure.py tests/test_behaviour_codegraph.py"
  [pipeline/dvc_graph.py]="tests/test_dvc_graph.py
    tests/test_orchestration.py::test_a_selected_stage_is_told_which_out_of_date_stages_it_reads
    tests/test_behaviour_side_commands.py::test_an_empty_dvc_lock_is_one_line_naming_it_and_the_remedy"
  # the checks before a run, in process; the CLI's tests (test_behaviour_side_commands.py) run dvc and the stages in
  # subprocesses (up to 22 s each, paid again by every mutant) and are left to the main suite
  [pipeline/run_checks.py]="tests/test_run_checks.py tests/test_config.py tests/test_behaviour_config.py"
  [pipeline/dvc_deps.py]="tests/test_behaviour_codegraph.py
    tests/test_cache_identity.py::test_dvc_yaml_code_deps_equal_every_stage_import_closure
    tests/test_cache_identity.py::test_running_stage_check_reads_every_dvc_addressing"
  [pipeline/checkpoint.py]="tests/test_behaviour_checkpoint.py tests/test_behaviour_training.py
    tests/test_behaviour_atomic.py"
  [models/gpt.py]="tests/test_gpt.py"
  [models/maskgit.py]="tests/test_maskgit.py"
  [training/vq_loss.py]="tests/test_behaviour_vqgan.py"
  [pipeline/shards.py]="tests/test_behaviour_shards.py tests/test_prepare.py tests/test_behaviour_determinism.py"
  [pipeline/images.py]="tests/test_behaviour_images.py tests/test_prepare.py tests/test_behaviour_channels.py"
  [models/vqgan.py]="tests/test_behaviour_vqgan_model.py tests/test_vqgan_models.py tests/test_behaviour_channels.py
    tests/test_behaviour_vqgan.py"
  [models/lpips.py]="tests/test_vqgan_models.py"
  [pipeline/out_guard.py]="tests/test_out_guard.py tests/test_behaviour_out_guard.py"
  [training/gan.py]="tests/test_behaviour_gan.py tests/test_gan_image_d.py tests/test_gan_recipes.py
    tests/test_train_gan.py"
  # test_ddp: two-rank runs under torchrun (the DDP wrap, the means over ranks, every rank's mask generator)
  [training/ar.py]="tests/test_train_transformer.py tests/test_train_maskgit.py tests/test_ddp.py"
  [stages/sample.py]="tests/test_train_transformer.py tests/test_eval_stages.py tests/test_train_gan.py
    tests/test_train_maskgit.py"
  [stages/prepare.py]="tests/test_prepare.py tests/test_behaviour_channels.py
    tests/test_behaviour_planted_vqgan_tokenize.py::test_max_per_split_keeps_exactly_the_first_n_of_each_split
    tests/test_behaviour_planted_vqgan_tokenize.py::test_the_fingerprint_covers_the_labels
    tests/test_behaviour_planted_vqgan_tokenize.py::test_min_side_and_max_pixels_are_the_prepare_sections
    tests/test_behaviour_planted_vqgan_tokenize.py::test_shards_of_files_carry_their_origin_and_idx_shards_do_not"
  # the small plumbing modules (session 29): their in-process tests
  [pipeline/locks.py]="tests/test_behaviour_planted_plumbing.py"
  [pipeline/runlog.py]="tests/test_behaviour_planted_plumbing.py tests/test_behaviour_atomic.py
    tests/test_doctor.py::test_run_facts_name_what_decides_the_bytes
    tests/test_behaviour_side_commands.py::test_run_facts_sit_beside_the_metrics_under_its_stem
    tests/test_behaviour_side_commands.py::test_the_metrics_file_takes_its_run_logs_times_and_a_restored_one_has_no_facts"
  [pipeline/presets.py]="tests/test_behaviour_config.py tests/test_config.py
    tests/test_behaviour_side_commands.py::test_an_empty_preset_is_refused_on_the_command_line_and_a_near_miss_is_named
    tests/test_behaviour_side_commands.py::test_a_stage_of_the_dataset_a_preset_adds_is_selected_by_its_full_name
    tests/test_behaviour_side_commands.py::test_a_preset_is_a_yaml_or_yml_file_under_configs_and_a_missing_one_lists_those_there"
  [pipeline/compare.py]="tests/test_compare.py"
  [pipeline/prepared.py]="tests/test_behaviour_planted_plumbing.py tests/test_behaviour_channels.py"
  [pipeline/errors.py]="tests/test_behaviour_planted_plumbing.py tests/test_disk_full.py tests/test_behaviour_config.py"
  [pipeline/report.py]="tests/test_behaviour_planted_plumbing.py tests/test_behaviour_planted_models.py"
  [pipeline/stage_cli.py]="tests/test_behaviour_planted_plumbing.py"
  [pipeline/env.py]="tests/test_behaviour_planted_plumbing.py tests/test_doctor.py"
  [pipeline/fid_reference.py]="tests/test_fid.py tests/test_behaviour_planted_plumbing.py
    tests/test_behaviour_planted_models.py
    tests/test_behaviour_side_commands.py::test_a_reference_whose_meta_lacks_a_key_is_refused"
  [pipeline/vqgan_io.py]="tests/test_behaviour_planted_plumbing.py tests/test_behaviour_channels.py
    tests/test_behaviour_tokens.py tests/test_tokenize.py::test_load_vqgan_refuses_a_foreign_or_damaged_folder_in_one_line
    tests/test_behaviour_side_commands.py::test_pixels_survive_the_model_range_round_trip_exactly"
)
# extra pytest arguments, one per line (the FID network tests take a minute each call: left to the main suite)
declare -A ARGS=(
  [pipeline/fid.py]=$'-k\nnot real_network'
  # the out_guard tests that run dvc and the CLI in subprocesses (5-20 s each) never see a mutant: main suite
  [pipeline/out_guard.py]=$'-k\nnot (stops_before_dvc or cli_refuses or failed_first_run or sigterm_undoes)'
  # the install tests run scripts/install.sh on requirements/, which the scratch copy has not
  [pipeline/locks.py]=$'-k\nnot test_install_'
  [pipeline/runlog.py]=$'-k\nnot test_install_'
  [pipeline/prepared.py]=$'-k\nnot test_install_'
  [pipeline/vqgan_io.py]=$'-k\nnot test_install_'
  [pipeline/errors.py]=$'-k\nnot test_install_'
  [pipeline/report.py]=$'-k\nnot test_install_'
  [pipeline/fid_reference.py]=$'-k\nnot test_install_ and not real_network'
  [pipeline/stage_cli.py]=$'-k\nnot test_install_'
  [pipeline/env.py]=$'-k\nnot test_install_ and not gpu_check and not cuda_constraints'
)
ORDER=(pipeline/atomic.py pipeline/fid.py models/quantizer.py training/common.py pipeline/device.py
       pipeline/tokens.py models/attention.py pipeline/config.py pipeline/codegraph.py pipeline/layering.py
       pipeline/dvc_graph.py pipeline/run_checks.py pipeline/dvc_deps.py pipeline/checkpoint.py models/gpt.py
       models/maskgit.py training/vq_loss.py pipeline/shards.py pipeline/images.py models/vqgan.py models/lpips.py
       pipeline/out_guard.py training/gan.py training/ar.py stages/sample.py stages/prepare.py pipeline/locks.py
       pipeline/runlog.py pipeline/presets.py pipeline/compare.py pipeline/prepared.py pipeline/vqgan_io.py
       pipeline/errors.py pipeline/report.py pipeline/fid_reference.py pipeline/stage_cli.py pipeline/env.py)

[ -x .venv/bin/python ] || bash scripts/install.sh
if [ ! -x "$VENV/bin/mutmut" ]; then
  base=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
  "$base" -m venv "$VENV"
  .venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_project_venv.pth"
  "$VENV/bin/pip" install -q "mutmut==$MUTMUT_VERSION"
fi

modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=("${ORDER[@]}")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# tests that run `dvc` find the project venv's (after the mutmut venv, whose python runs the tests)
export PATH="$PATH:$ROOT/.venv/bin"
for module in "${modules[@]}"; do
  tests=${TESTS[$module]:-}
  [ -n "$tests" ] || { echo "error: no test list for $module (known: ${ORDER[*]})" >&2; exit 2; }
  dir="$WORK/$(echo "$module" | tr / _)"
  rm -rf "$dir" && mkdir -p "$dir"
  # params.yaml, dvc.yaml, configs/: the config tests validate the project's own params against every stage
  cp -r pipeline models training stages tests configs scripts pyproject.toml params.yaml dvc.yaml "$dir/"
  {
    echo "[mutmut]"
    echo "source_paths ="
    echo "    pipeline"
    echo "    models"
    echo "    training"
    echo "    stages"
    echo "only_mutate = $module"
    echo "also_copy ="
    printf '    %s\n' configs scripts params.yaml dvc.yaml
    echo "pytest_add_cli_args ="
    # mutmut's trampolines make long lines: the width check would fail every run
    printf '    %s\n' -p no:cacheprovider -q --deselect
    echo "    tests/test_structure.py::test_no_line_is_longer_than_120_characters"
    [ -z "${ARGS[$module]:-}" ] || while IFS= read -r arg; do echo "    $arg"; done <<< "${ARGS[$module]}"
    [ -z "${MUT_PYTEST_ARGS:-}" ] || printf '    %s\n' $MUT_PYTEST_ARGS  # e.g. --deselect <a failing test>
    echo "pytest_add_cli_args_test_selection ="
    for t in $tests; do echo "    $t"; done
  } > "$dir/setup.cfg"
  echo "== $module (tests: $tests)"
  start=$(date +%s)
  # MUT_NAMES: only these mutants (mutmut's names, globs allowed), e.g. 'training.gan.x_ema_decay_at*'
  (set -f; cd "$dir" && "$VENV/bin/mutmut" run --max-children "$JOBS" ${MUT_NAMES:-} 2>&1 | tr '\r' '\n' | grep -v '^\s*$' |
    tail -n 3)
  (cd "$dir" && "$VENV/bin/mutmut" export-cicd-stats >/dev/null && cat mutants/mutmut-cicd-stats.json && echo)
  echo "survivors ($module, $(( $(date +%s) - start )) s):"
  (cd "$dir" && "$VENV/bin/mutmut" results | grep -v ': killed$' || true)
done
