fn main() {
    std::process::exit(helix::cli::main());
}
