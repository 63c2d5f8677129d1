"""Ray Serve application: an OpenAI-compatible HTTP API over ADORE shard groups (workers/).

    cluster.app:build_app(args)   the Serve application builder (serve run / serve deploy / KubeRay)
    adore serve ...               a local Ray + Serve from the command line (cluster/cli.py)
"""
