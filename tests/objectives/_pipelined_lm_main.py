"""`recurdepth ARGS` with the plain LM objective driven through `pipelined_forward` under pipeline parallelism
(instead of the looped schedule): the trainer's `pipeline_run` hook and the primitive, end to end.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/objectives/_pipelined_lm_main.py train ...
"""

from recurdepth.objectives import OBJECTIVES, LMObjective, masked_loss_sum
from recurdepth.parallel.passes import pipelined_forward, run_micro_batches


class PipelinedLMObjective(LMObjective):
    """The LM loss; under PP one `pipelined_forward` per micro-batch."""

    def pipeline_run(self, model, batches, window):
        def mb_loss(model, mb, window, link):
            out = pipelined_forward(model, window, link, input_ids=mb.tokens, labels=mb.labels,
                                    sample_ids=mb.sample_ids)
            return None if out is None else masked_loss_sum(out, mb.loss_mask)

        return run_micro_batches(model, batches, window, mb_loss)


if __name__ == "__main__":
    from recurdepth.cli import main

    OBJECTIVES["lm"] = PipelinedLMObjective
    main()
