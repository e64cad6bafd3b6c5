//! The `lightseq` command: forward, info, demo.

mod bench;
mod demo;
mod demo_train;
mod forward;
mod generate;
mod info;
mod input;
mod plot;
mod text;
mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lightseq",
    version,
    about = "Transformer inference on CPU and CUDA, reading Hugging Face checkpoints directly"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model on a batch of token ids and save its outputs (safetensors, f32).
    Forward {
        /// Model directory (config.json + model.safetensors or sharded safetensors).
        model_dir: PathBuf,
        /// JSON: {"input_ids": [[...], ...], optional "token_type_ids"}; sequences may differ in length.
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors: `hidden` [batch, max_len, hidden] (encoders) or `logits` [batch, max_len, vocab].
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda, cuda:N or auto (the GPU when there is one).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Weight and compute dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Generate from prompts (decoder-only) or sources (encoder-decoders): greedy, beam
    /// search, diverse beam search or sampling, with HF generate's options.
    Generate(Box<generate::GenerateArgs>),
    /// Time a forward pass, a generation or a training update (model directory or preset
    /// of real shapes).
    Bench(Box<bench::BenchArgs>),
    /// Train a model from scratch or fine-tune one (Marian, BART, mBART, BERT, GPT2, ViT)
    /// on the CPU or a GPU, in f32, f16 or bf16.
    Train(Box<train::TrainArgs>),
    /// Convert a checkpoint of another framework into a Hugging Face model directory.
    Convert {
        #[command(subcommand)]
        from: ConvertFrom,
    },
    /// Show a model's architecture, sizes, parameter count and dtypes.
    Info {
        /// Model directory.
        model_dir: Option<PathBuf>,
        /// Print the config.json of a preset (bert-base, gpt2, transformer-base,
        /// transformer-big, bart-base) instead.
        #[arg(long, conflicts_with = "model_dir")]
        preset: Option<String>,
    },
    /// Check parity with Hugging Face on the built-in fixture models and measure tokens/s.
    Demo {
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Updates of the training demo (0 skips it).
        #[arg(long, default_value_t = 1500)]
        train_steps: u64,
    },
}

#[derive(Subcommand)]
enum ConvertFrom {
    /// A fairseq `transformer` checkpoint (torch.save .pt); writes config.json + model.safetensors
    /// of the equivalent HF model (FSMT, M2M100 or BART).
    Fairseq {
        /// The fairseq checkpoint.
        checkpoint: PathBuf,
        /// Output model directory.
        out_dir: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    // Kernel modules missing from the cache compile on background threads once a GPU is
    // opened; they are waited for before the process exits.
    let training = matches!(cli.command, Command::Train(_) | Command::Demo { .. });
    lightseq::backend::cuda::nvrtc::enable_prewarm(training);
    let result = match cli.command {
        Command::Forward {
            model_dir,
            input,
            out,
            device,
            dtype,
        } => forward::run(&model_dir, &input, &out, &device, &dtype),
        Command::Info { model_dir, preset } => match (model_dir, preset) {
            (Some(d), None) => info::run(&d),
            (None, Some(p)) => info::preset(&p),
            _ => Err(anyhow::anyhow!("give a model directory or --preset NAME")),
        },
        Command::Generate(args) => generate::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Convert {
            from:
                ConvertFrom::Fairseq {
                    checkpoint,
                    out_dir,
                },
        } => convert_fairseq(&checkpoint, &out_dir),
        Command::Demo {
            device,
            train_steps,
        } => demo::run(&device, train_steps),
    };
    lightseq::backend::cuda::nvrtc::finish_prewarm();
    if let Err(e) = result {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn convert_fairseq(checkpoint: &std::path::Path, out_dir: &std::path::Path) -> anyhow::Result<()> {
    let c = lightseq::io::fairseq::convert(checkpoint, out_dir)?;
    eprintln!(
        "lightseq convert: {} -> {} ({}): {}+{} layers, d_model {}, vocab {}/{}, {} tensors",
        checkpoint.display(),
        out_dir.display(),
        c.model_type,
        c.encoder_layers,
        c.decoder_layers,
        c.d_model,
        c.src_vocab,
        c.tgt_vocab,
        c.tensors
    );
    Ok(())
}
