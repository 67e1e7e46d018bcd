//! Lists every candidate backend kvq can see, its rank, why it was or was not
//! chosen, and the choice. `KVQ_BACKEND` and `KVQ_ADAPTER` apply.
//!
//!     cargo run --example probe

fn main() {
    let pref = kvq::Preference::allow_cpu();
    match kvq::probe(&pref) {
        Ok(p) => {
            println!(
                "kvq probe (preference after environment: {:?})",
                p.preference
            );
            println!("{p}");
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
