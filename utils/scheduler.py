"""Flow-matching schedule of Self-Forcing: sigma goes from 1 (noise) to 0 (data), shifted.

Convention: x_t = (1 - sigma) * x0 + sigma * noise, and the model predicts flow = noise - x0.
Timesteps are looked up by nearest value (argmin), as upstream does.
"""
import torch


class FlowMatchScheduler:
    def __init__(self, num_train_timesteps=1000, shift=5.0, sigma_max=1.0, sigma_min=0.0, extra_one_step=True):
        self.num_train_timesteps = num_train_timesteps
        sigmas = torch.linspace(sigma_max, sigma_min, num_train_timesteps + int(extra_one_step))[:num_train_timesteps]
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)  # float32 [num_train_timesteps]
        self.timesteps = self.sigmas * num_train_timesteps
        self._on_device = {}

    def _tables(self, device):
        """(timesteps, sigmas) on ``device``, copied once, so lookups never wait on a host copy."""
        if device not in self._on_device:
            self._on_device[device] = (self.timesteps.to(device), self.sigmas.to(device))
        return self._on_device[device]

    def sigma(self, timestep, dtype=torch.float32):
        """Sigma of the nearest training timestep, for each entry of timestep [N]."""
        timesteps, sigmas = self._tables(timestep.device)
        index = (timesteps.to(dtype)[None] - timestep.to(dtype)[:, None]).abs().argmin(dim=1)
        return sigmas.to(dtype)[index]

    def warp(self, denoising_steps):
        """Map a list of step values such as [1000, 750, 500, 250] onto the shifted schedule by index
        (1000 - step), 0 meaning the end: gives [1000, 937.5, 833.33, 625] for shift 5."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return table[self.num_train_timesteps - torch.as_tensor(denoising_steps, dtype=torch.long)].tolist()

    def add_noise(self, original, noise, timestep):
        """x_t for original, noise [N, ...] and timestep [N]; in the noise's dtype."""
        sigma = self.sigma(timestep).view(-1, *[1] * (original.dim() - 1))
        return ((1 - sigma) * original + sigma * noise).type_as(noise)

    def flow_to_x0(self, flow, x_t, timestep):
        """x0 = x_t - sigma * flow in float64, for flow, x_t [N, ...] and timestep [N]; in flow's dtype."""
        sigma = self.sigma(timestep, torch.float64).view(-1, *[1] * (flow.dim() - 1))
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)
