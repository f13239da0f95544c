"""Train state, optax optimizer, EMA and the generic train step."""
from unclip_jax.train.ema import EmaConfig, ema_decay_fn, ema_update  # noqa: F401
from unclip_jax.train.optim import (  # noqa: F401
    OptimizerConfig,
    learning_rate_from_state,
    make_optimizer,
    make_schedule,
)
from unclip_jax.train.state import TrainState  # noqa: F401
from unclip_jax.train.step import (  # noqa: F401
    cast_floating,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
)
from unclip_jax.train.losses import (  # noqa: F401,E402
    STAGES,
    build_stage,
    inpaint_params_from_decoder,
    make_loss_fn,
)
from unclip_jax.train.loop import (  # noqa: F401,E402
    DataSource,
    EmbeddingDataset,
    NonFiniteLossError,
    SyntheticSource,
    TrainResult,
    train,
    train_config,
)
