"""Each test of a library's own suite that passes plain and not with ckptguard, and why (``compat/run.py``).

A reason is either a deliberate difference, which README's "Compatibility with the libraries' own tests"
lists with the same words, or starts with ``open:``: a difference not meant to stay, kept here so
``make compat`` passes until the integration is fixed (and ``make compat`` fails once it is, so the
entry goes).
"""

from __future__ import annotations

# Accelerate: none. Its tests pass guarded as they pass plain (checkpoints keep Accelerate's names,
# checkpoint_{iteration}, under project_dir/checkpoints).
ACCELERATE: dict[str, str] = {}

# Lightning: each reason below is one of README's list (the same words). The tests are those of Lightning
# 2.6.5's tree that pass plain and not guarded (``LIGHTNING_TESTS=... python compat/run.py lightning``),
# each checked by its error.
DIRECTORY = (
    "deliberate: a .ckpt is a directory (Lightning's checkpoint dict as checkpoint.pt, and its manifest), "
    "published by one rename once complete and verified, so a test that opens it as a file (torch.load, "
    "Lightning's own load_from_checkpoint by URL) or asserts os.path.isfile fails; Lightning's "
    "MyModule.load_from_checkpoint(path) loads it, verified"
)
RUN_FILES = (
    "deliberate: a ModelCheckpoint dirpath is a run directory: besides its .ckpt checkpoints it holds LATEST, "
    "events.jsonl and the run lock (.ckptguard.lock, .ckptguard.lock.owner), so a test that lists it finds them too"
)
CURRENT_SCORE = (
    "deliberate: torch.load of every entry of the dirpath meets LATEST and the .ckpt directories (both above)"
)
LINK = (
    'deliberate: ModelCheckpoint(save_last="link") is refused before the first step (UnsupportedStateError, '
    "remedy save_last=True): Lightning replaces the link outside the commit protocol"
)
STORAGE_OPTIONS = (
    "deliberate: storage_options are refused (TypeError): the plugin saves to local or mounted directories"
)
NOT_FOUND = (
    "deliberate: a missing ckpt_path is CheckpointNotFoundError naming the path and the remedy, not FileNotFoundError"
)
PLAIN_FILE = (
    "deliberate: a .ckpt saved without ckptguard (a plain torch.save file) is refused as unverifiable "
    "(CorruptCheckpointError saying so), never loaded unchecked"
)


def _listed(reason: str, module: str, tests: tuple[str, ...]) -> dict[str, str]:
    return {f"{module}::{test}": reason for test in tests}


LIGHTNING = {
    **_listed(
        DIRECTORY,
        "checkpointing/test_model_checkpoint.py",
        (
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubleCallbackOnAfterBackward]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubleCallbackOnBeforeBackward]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubleCallbackOnBeforeOptimizerStep]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubleCallbackOnBeforeZeroGrad]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnFitEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnTrainBatchEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnTrainBatchStart]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnTrainEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnTrainEpochEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnTrainEpochStart]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnValidationBatchEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnValidationBatchStart]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnValidationEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnValidationEpochEnd]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnValidationEpochStart]",
            "test_model_checkpoint_on_exception_in_other_callbacks[TroubledCallbackOnValidationStart]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelBackward]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelConfigureGradienClipping]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelInTrainingStep]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelInValidationStep]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnAfterBackward]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnBeforeBackward]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnBeforeOptimizerStep]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnBeforeZeroGrad]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnFitEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnTrainBatchEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnTrainBatchStart]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnTrainEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnTrainEpochEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnTrainEpochStart]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationBatchEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationBatchStart]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationEpochEnd]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationEpochStart]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationModelEval]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationModelTrain]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOnValidationStart]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOptimizerStep]",
            "test_model_checkpoint_on_exception_parametrized[TroubledModelOptimizerZeroGrad]",
            "test_model_checkpoint_on_exception_run_condition_on_train_batch_start",
            "test_model_checkpoint_save_last_checkpoint_contents",
            "test_model_checkpoint_score_and_ckpt[False-False-False-val_log]",
            "test_model_checkpoint_score_and_ckpt[False-False-True-val_log]",
            "test_model_checkpoint_score_and_ckpt[False-True-False-train_log_epoch]",
            "test_model_checkpoint_score_and_ckpt[True-False-False-val_log]",
            "test_model_checkpoint_score_and_ckpt[True-False-True-val_log]",
            "test_model_checkpoint_score_and_ckpt[True-True-False-train_log_epoch]",
            "test_model_checkpoint_score_and_ckpt_val_check_interval[0.25-False-True]",
            "test_model_checkpoint_score_and_ckpt_val_check_interval[0.25-True-True]",
            "test_model_checkpoint_score_and_ckpt_val_check_interval[0.42-False-False]",
        ),
    ),
    **_listed(
        DIRECTORY,
        "models/test_restore.py",
        (
            "test_correct_step_and_epoch",
            "test_load_model_from_checkpoint[GenericValTestLossBoringModel]",
            "test_load_model_from_checkpoint[ValTestLossBoringModel]",
            "test_strict_model_load_less_params[True]",
            "test_strict_model_load_more_params[True]",
            "test_trainer_properties_restore_ckpt_path",
        ),
    ),
    **_listed(
        RUN_FILES,
        "checkpointing/test_model_checkpoint.py",
        (
            "test_check_val_every_n_epochs_top_k_integration",
            "test_checkpoint_repeated_strategy",
            "test_checkpoint_repeated_strategy_extended",
            "test_ckpt_every_n_train_steps",
            "test_ckpt_version_after_rerun_new_trainer",
            "test_ckpt_version_after_rerun_same_trainer",
            "test_ckpt_version_counter_disabled_after_rerun_new_trainer",
            "test_default_checkpoint_behavior",
            "test_model_checkpoint_every_n_epochs[0]",
            "test_model_checkpoint_every_n_epochs[1]",
            "test_model_checkpoint_every_n_epochs[2]",
            "test_model_checkpoint_every_n_epochs[3]",
            "test_model_checkpoint_file_extension",
            "test_model_checkpoint_save_last[True]",
            "test_model_checkpoint_save_last_none_monitor",
            "test_model_checkpoint_topk_all",
            "test_model_checkpoint_topk_zero",
            "test_model_checkpoint_train_time_interval",
            "test_model_checkpoint_with_non_string_input[-1]",
            "test_none_monitor_not_alternating",
            "test_none_monitor_saves_correct_best_model_path",
            "test_resume_and_old_checkpoint_files_remain[False]",
            "test_resume_and_old_checkpoint_files_remain[True]",
            "test_resume_training_preserves_old_ckpt_last",
            "test_save_last_saves_correct_last_model_path",
            "test_save_last_versioning",
            "test_val_check_interval_checkpoint_files",
        ),
    ),
    **_listed(RUN_FILES, "checkpointing/test_trainer_checkpoint.py", ("test_finetuning_with_ckpt_path",)),
    **_listed(RUN_FILES, "trainer/connectors/test_checkpoint_connector.py", ("test_hpc_restore_attempt",)),
    **_listed(CURRENT_SCORE, "checkpointing/test_model_checkpoint.py", ("test_current_score",)),
    **_listed(
        LINK,
        "checkpointing/test_checkpoint_callback_frequency.py",
        (
            "test_top_k[link-1-1-1.0-1]",
            "test_top_k[link-2-1-0.25-4]",
            "test_top_k[link-2-2-0.3-6]",
            "test_top_k[link-2-2-1.0-2]",
        ),
    ),
    **_listed(LINK, "checkpointing/test_model_checkpoint.py", ("test_model_checkpoint_save_last[link]",)),
    **_listed(
        STORAGE_OPTIONS, "checkpointing/test_trainer_checkpoint.py", ("test_trainer_save_checkpoint_storage_options",)
    ),
    **_listed(NOT_FOUND, "models/test_restore.py", ("test_try_resume_from_non_existing_checkpoint",)),
    **_listed(
        PLAIN_FILE, "trainer/connectors/test_checkpoint_connector.py", ("test_stateful_trainer_ckpt_path_support",)
    ),
}

DIFFERENCES = {"accelerate": ACCELERATE, "lightning": LIGHTNING}
