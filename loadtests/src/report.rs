//! `loadgen report`: placeholder
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {}
pub fn report(_args: ReportArgs) -> Result<(), String> {
    Ok(())
}
