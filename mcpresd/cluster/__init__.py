"""The cluster site: requests the host cannot serve, forwarded to a Slurm cluster.

`slurm` is the adapter (Slurm's commands in, values out, a timeout on every call); `site` keeps the
cluster's allocations in the store and in step with Slurm. The pure parts are in `mcpresd.core.cluster`.
"""
