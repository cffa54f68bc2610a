# Test closure for tests/real_nix.rs: every shape of file system object a NAR can hold, built
# with /bin/sh only (no nixpkgs). `salt` is part of every name, to start afresh when needed.
{ salt }:
let
  mk = name: script: derivation {
    name = "${name}-${salt}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ("export PATH=/bin:/usr/bin; set -e; " + script) ];
  };
  leaf = mk "leaf" "echo leaf-${salt} > $out";
  fileRoot = mk "file-root" "printf 'just a file\\n' > $out";
  exeRoot = mk "exe-root" "printf '#!/bin/sh\\necho hi\\n' > $out; chmod 0755 $out";
  emptyRoot = mk "empty-root" ": > $out";
  symlinkRoot = mk "symlink-root" "ln -s ${leaf} $out";
  shapes = mk "shapes" ''
    mkdir -p $out/bin $out/empty-dir $out/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t
    printf '#!/bin/sh\necho hi from ${leaf}\n' > $out/bin/exe; chmod +x $out/bin/exe
    : > $out/empty-file; : > $out/empty-exe; chmod +x $out/empty-exe
    echo deep > $out/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/deep.txt
    ln -s exe $out/bin/rel-link; ln -s ${leaf} $out/abs-link-to-dep
    ln -s /nonexistent/target $out/dangling-link; ln -s a/b/c $out/dir-link
    ln -s "../target with spaces/ü" $out/odd-link
    printf 'x\n' > "$out/file with spaces"; printf 'u\n' > "$out/ünïcødé-名前"
    head -c 1048576 /dev/urandom > $out/big
    for n in B a A b a.b a-b a0 Z z _ 0 9 '~' '+'; do echo "$n" > "$out/order-$n"; done
    printf q > "$out/q\"uote"; printf b > "$out/back\\slash"
    printf t > "$out/$(printf 'tab\tx')"; printf c > "$out/$(printf 'ctl\001x')"; printf e > "$out/$(printf 'esc\033x')"
    printf n > "$out/$(printf 'nl\nx')"
    mkdir $out/many; i=0; while [ $i -lt 300 ]; do echo $i > $out/many/f$i; i=$((i+1)); done
    echo "self ref: $out" > $out/selfref
  '';
in mk "top" "mkdir -p $out; echo ${shapes} ${symlinkRoot} ${fileRoot} ${exeRoot} ${emptyRoot} > $out/refs"
