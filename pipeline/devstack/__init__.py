"""Local development services (a SeaweedFS S3 server on loopback) for tests and the local stack."""

from pipeline.devstack.seaweed import SeaweedServer, start_seaweed

__all__ = ["SeaweedServer", "start_seaweed"]
