"""The networks and the process they model: what a config builds and what one step costs.

The config dataclasses (``config``, the one object passed whole), the blocks and the two
networks (``blocks``, ``unet``, ``iunet``), what builds them and routes t to timestep experts
(``experts``), the parts experts share (``shared_parts``), the weight-shared supernet with
its elastic widths and splits (``supernet``) and the width schedules sampled from it
(``schedule``), the named reference designs (``references``), DDPM/DDIM (``diffusion``),
and measured cost: MACs and parameters (``macs``) and whether a network fits a device
(``resources``). It may import ``meme.common``; nothing about data, training or sampling.
"""
