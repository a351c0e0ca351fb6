"""Discrimination-aware channel pruning (DCP; paper 003, ``methods.md`` §3), one job per file:

* :mod:`.pivots` — residual blocks, stages, pivots and the candidate layers, found on the graph;
* :mod:`.heads` — the auxiliary classifiers as side outputs: ``dcp_heads`` (exact),
  ``dcp_remove_heads``, :func:`aux_model` (main and auxiliary logits for training);
* :mod:`.finetune` — phase 1, fine-tuning with the auxiliary losses (Algorithm S1 or one summed
  loss; progress bar, resumable), and :func:`fit_heads` (heads fitted to frozen features);
* :mod:`.subgraph` — the prefix and suffix GraphModules that selection runs;
* :mod:`.select` — phase 2's greedy selection of one layer (Algorithm 2, DCP-Adapt);
* :mod:`.pass_` — the pass ``dcp`` (:class:`DiscriminationAwarePruning`), which records consumer
  masks that ``fold_masks`` → ``materialize`` turn into a smaller model;
* :mod:`.data`, :mod:`.errors` — data checking, :class:`DCPError`.
"""
from .errors import DCPError
from .data import DataSource
from .pivots import Layer, ResidualBlock, Structure, candidate_layers, find_structure, pivot_blocks, weight_depth
from .heads import InsertAuxiliaryHeads, RemoveAuxiliaryHeads, aux_model, dcp_state, heads_of, remove_heads
from .finetune import FinetuneResult, LossMeter, finetune, fit_heads
from .select import LayerProblem, LayerSelection, accumulate, channel_scores, greedy_select
from .pass_ import DiscriminationAwarePruning, keep_count

__all__ = [
    "DiscriminationAwarePruning", "InsertAuxiliaryHeads", "RemoveAuxiliaryHeads", "finetune", "fit_heads",
    "aux_model", "heads_of", "remove_heads", "dcp_state", "find_structure", "candidate_layers", "pivot_blocks",
    "weight_depth", "Structure", "ResidualBlock", "Layer", "LayerProblem", "LayerSelection", "greedy_select",
    "accumulate", "channel_scores", "keep_count", "FinetuneResult", "LossMeter", "DataSource", "DCPError",
]
