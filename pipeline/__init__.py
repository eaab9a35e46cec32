"""Between the entry scripts and the pieces (data, loss, model, utils): what every training
stage does around its own story (``stage``), the evaluation of a checkpoint (``evaluate``),
and the experiment that chains the stages (``plan``, ``experiment``, ``sweep``)."""
