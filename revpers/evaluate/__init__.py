"""Privacy/utility evaluation over whole sets (`revpers evaluate`) and setting sweeps (`revpers sweep`).

``pairs`` (which file and face belongs to which), ``identity`` (re-ID per recognizer),
``attributes`` (head pose, expression; gaze not measured), ``quality`` (background PSNR/SSIM,
detection agreement, FID/KID), ``core`` (the evaluator), ``report`` (metrics.json, table.md, plots,
index.html), ``sweep`` and ``cli``. docs/evaluation.md explains every number.
"""
