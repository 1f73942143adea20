"""RunPod launcher: templates -> SDK/REST requests, a record of what `up` created, readiness checks.

Ray does not appear here: the pods run `infra/bootstrap.sh`, and we only talk to the RunPod API and,
once a pod is up, to the Ray job server over HTTP to see that it answers.
"""
