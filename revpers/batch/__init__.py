"""Anonymizing image collections on Ray Data (optional extra ``revpers[batch]``): input planning
(``inputs``), the actor that runs the model or a gRPC client (``workers``), the Parquet audit table
and review list (``tables``) and the run itself (``run``). These modules import Ray and pyarrow at
their top; the command line (``revpers.cli.batch``) imports them only when a batch runs.
"""
