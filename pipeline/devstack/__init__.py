"""Local development services, a SeaweedFS S3 server and a token-auth Ray head, for the tests and
the local stack (`moola-pipeline stack`)."""

from pipeline.devstack.seaweed import SeaweedServer, start_seaweed

__all__ = ["SeaweedServer", "start_seaweed"]
