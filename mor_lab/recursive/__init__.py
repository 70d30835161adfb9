"""Relaxed Recursive Transformers: share layers across depth, relax the sharing with SVD-initialised LoRA.

    conversion = convert(model, strategy="middle_cycle", num_recursions=2, init="stepwise")
    relax(conversion.model, model, conversion.sharing, attn_rank=16, mlp_rank=16)
    uptrain(conversion.model, model, tokens, steps=100)

``sharing`` (strategies, initializations, the plan as data), ``convert`` (a recursive Decoder from
a vanilla one), ``relax`` (per-position LoRA, merge/unmerge), ``uptrain`` (distillation).
"""
from .convert import Conversion, convert, count_parameters, parameter_counts, select_layers
from .relax import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, PROJECTIONS, RelaxConfig, merge, relative_residuals,
                    RankCurves, relax, residual_by_rank, svd_factors, svd_lora, unmerge)
from .sharing import (AVERAGE, CYCLE, INITIALIZATIONS, LOWER, MIDDLE_CYCLE, MIDDLE_SEQUENCE, RANDOM, SEQUENCE,
                      STEPWISE, STRATEGIES, UPPER, DepthStep, RecursiveConfig, SharingPlan, base_depth,
                      init_sources, subsampled_layers)
from .uptrain import UptrainConfig, UptrainResult, distill_kl, trainable_parameters, uptrain, uptrain_table

__all__ = ["ATTENTION_PROJECTIONS", "AVERAGE", "CYCLE", "Conversion", "DepthStep", "INITIALIZATIONS", "LOWER",
           "MIDDLE_CYCLE", "MIDDLE_SEQUENCE", "MLP_PROJECTIONS", "PROJECTIONS", "RANDOM", "RankCurves", "RecursiveConfig",
           "RelaxConfig", "SEQUENCE", "STEPWISE", "STRATEGIES", "SharingPlan", "UPPER", "UptrainConfig",
           "UptrainResult", "base_depth", "convert", "count_parameters", "distill_kl", "init_sources", "merge",
           "parameter_counts", "relative_residuals", "relax", "residual_by_rank", "select_layers", "subsampled_layers", "svd_factors",
           "svd_lora", "trainable_parameters", "unmerge", "uptrain", "uptrain_table"]
