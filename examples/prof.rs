use burn::tensor::{DType, Device, Tensor, TensorData};
use std::time::Instant;
fn main() {
    let d = Device::flex();
    let e = Tensor::<2>::from_data(
        TensorData::new(vec![0.01f32; 49152 * 576], [49152, 576]),
        (&d, DType::F32),
    );
    let x = Tensor::<2>::from_data(
        TensorData::new(vec![0.01f32; 576], [1, 576]),
        (&d, DType::F32),
    );
    let w = Tensor::<2>::from_data(
        TensorData::new(vec![0.01f32; 576 * 1536], [576, 1536]),
        (&d, DType::F32),
    );
    for _ in 0..3 {
        let t = Instant::now();
        let y = e.clone().matmul(x.clone().transpose()).transpose();
        let _ = y.into_data();
        println!("tied head: {:?}", t.elapsed());
        let t = Instant::now();
        for _ in 0..100 {
            let y = x.clone().matmul(w.clone());
            let _ = y.into_data();
        }
        println!("100 gemv 576x1536: {:?}", t.elapsed());
        let t = Instant::now();
        for _ in 0..100 {
            let y = burn::tensor::module::linear(x.clone().unsqueeze::<3>(), w.clone(), None);
            let _ = y.into_data();
        }
        println!("100 linear 3d: {:?}", t.elapsed());
        let t = Instant::now();
        for _ in 0..100 {
            let y = x
                .clone()
                .cast(burn::tensor::FloatDType::F32)
                .square()
                .mean_dim(1);
            let _ = y.into_data();
        }
        println!("100 norm-ish: {:?}", t.elapsed());
    }
}
