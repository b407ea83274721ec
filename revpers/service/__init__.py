"""The anonymization service in one process: images in and out, the anonymizer over a bundle's
models, typed reports, and the one request boundary (``request.anonymize_bytes``) that the command
line, the Triton model and batch jobs all call."""
