"""Training: the loop behind `kopru train` (`loop`), what trains in each recipe (`recipes`), resumable
checkpoints (`checkpoint`) and BLIP-2's Q-Former stage 1 (`qformer_stage1`)."""

from kopru.training.loop import (
    LR_SCHEDULE,
    QFORMER_HEADS_FILE,
    RUN_SETTINGS,
    EncodedDataset,
    TrainConfig,
    TrainSummary,
    build_model,
    changed_settings,
    check_data,
    evaluate,
    global_batches,
    load_data,
    read_config_file,
    run_settings,
    seed_everything,
    train,
    warmup_cosine,
)

__all__ = ["LR_SCHEDULE", "QFORMER_HEADS_FILE", "RUN_SETTINGS", "EncodedDataset", "TrainConfig", "TrainSummary",
           "build_model", "changed_settings", "check_data", "evaluate", "global_batches", "load_data",
           "read_config_file", "run_settings", "seed_everything", "train", "warmup_cosine"]
