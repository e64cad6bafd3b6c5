//! Derivatives of the activations: the scalar definition the CPU training ops use and the
//! CUDA kernels mirror (`activation_grad` in kernels/train.cu).

use crate::ops::Activation;

/// Derivative of an activation at its input `x`.
pub fn activation_grad(act: Activation, x: f32) -> f32 {
    let x64 = x as f64;
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    (match act {
        Activation::None => 1.0,
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x64 / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x64 * pdf
        }
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = c * (x64 + 0.044715 * x64.powi(3));
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x64 * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x64 * x64)
        }
        Activation::Silu => {
            let s = sig(x64);
            s + x64 * s * (1.0 - s)
        }
        Activation::QuickGelu => {
            let s = sig(1.702 * x64);
            s + 1.702 * x64 * s * (1.0 - s)
        }
        Activation::Tanh => 1.0 - x64.tanh().powi(2),
    }) as f32
}
