"""The networks and the process they model: what a config builds and what one step costs.

The config dataclasses (``config``, the one object passed whole), the blocks and the two
networks (``blocks``, ``unet``, ``iunet``, built by ``networks``), timestep experts and the
parts they share (``experts``, ``shared_parts``), the weight-shared supernet
(``supernet``), the named reference designs (``references``), DDPM/DDIM (``diffusion``),
and measured cost: MACs and parameters (``macs``) and whether a network fits a device
(``resources``). It may import ``meme.common``; nothing about data, training or sampling.
"""
