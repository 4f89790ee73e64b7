"""`fastserve bench {throughput,serve,latency}`: vLLM's benchmark commands, installed with the
package (vLLM keeps them in `vllm/benchmarks/`): offline throughput against transformers
(throughput.py), online serving under a request-rate sweep (serve.py, plot.py), and one
step's latency per batch size (latency.py), on workloads sampled as vLLM samples them
(datasets.py). device.py and roofline.py give the device's measured ceilings and a
workload's lower bound, shared with the repository's bench/ scripts."""
