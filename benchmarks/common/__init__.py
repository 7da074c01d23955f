"""What the benchmark scripts share, one place each:

- `machine`: the facts every report prints (cores, CPU, threads, load, date, versions, command) and the quiet,
  thread-pinned process the measurements run in;
- `model`: the embedded model as a backbone, and vocabulary-initialized prompts under a seed;
- `training`: softprompt and PEFT training side by side on the same model object (train_speed.py, the training
  half of scaling, profile_step.py), with the peak-memory meter and the independent reference loss;
- `serving`: the engine driver (a round of requests submitted at once to our engine or to the front to vLLM, and
  what each request got when), the request texts, decoding by the definition;
- `completions`: the streamed /v1/completions client (vLLM, or our own server) and the `vllm serve` process.
"""
