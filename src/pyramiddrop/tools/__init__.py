"""Tools built on the core: evaluation tables (`evaluate`, `stats`), the depth study (`study`), pictures of the kept
tokens (`show`), the schedule search (`tune`) and the latency benchmarks (`bench`, `bench_conversation`), all fed
by `inputs` (models, prompts, question files, images).

The core (`api`, `config`, `engine`, `scoring`, `adapters`, the schedules) never imports from here.
"""
