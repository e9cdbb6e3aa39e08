from dist_gan.cli import main

main()
