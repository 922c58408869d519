"""The data path: what a proxied request runs through (the proxy, the upstream connections,
HTTP parsing helpers) and what routing reads on each request (the router, the affinity
cookie, Maglev, the backends and their pool, the metrics). It is the compiled part:
scripts/build-fast compiles every module of this folder with mypyc, as one group, and
nothing here imports the rest of the balancer but `balancer._exceptions`."""
