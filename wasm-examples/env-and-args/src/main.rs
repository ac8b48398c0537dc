//! Prints its arguments as `arg[i]=...` and its environment as `env KEY=VALUE` (sorted by key),
//! to check what a pod's `args` and `env` turn into inside the guest.

use std::env;

fn main() {
    for (i, arg) in env::args_os().enumerate() {
        println!("arg[{i}]={}", arg.to_string_lossy());
    }
    let mut vars: Vec<_> = env::vars_os().collect();
    vars.sort();
    for (key, value) in vars {
        println!("env {}={}", key.to_string_lossy(), value.to_string_lossy());
    }
}
