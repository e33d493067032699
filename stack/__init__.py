"""Local stack that runs offline on 127.0.0.1: SQS endpoint, phrase-API stand-in and workers."""
