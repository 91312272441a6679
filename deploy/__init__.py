"""pdserve.deploy: the fleet on Ray (``pdserve up/status/scale/down``) and its config section.

``config`` (FleetConfig), ``cli`` (the commands), ``client`` (driver-side handle),
``controller`` (the fleet controller actor), ``lifecycle``/``placement`` (placement groups,
actor start/drain/release, resource checks), ``server_actor`` (uvicorn in a Ray actor),
``registry`` (router registration, worker probes), ``metrics`` (controller metrics, Prometheus
service discovery), ``ray_cluster`` (embedded loopback Ray head, state file), ``apps`` (the real
worker/router factories), ``standin`` (model-free stand-in apps), ``display`` (status table).
"""
